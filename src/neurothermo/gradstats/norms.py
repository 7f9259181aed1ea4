"""Per-sample squared gradient norms ``‖∇_θ l_i‖²`` from one forward and one backward pass.

Convention (docs/theory.md): ``loss_fn(outputs, targets)`` returns the MEAN of per-sample losses,
``l_B = (1/b) Σ_i l_i``. One backward of ``l_B`` gives, at every layer output ``y``, ``δ_i/b`` with
``δ_i = ∂l_i/∂y_i``. The layer rules (``rules/``) turn those and the recorded layer inputs into exact
per-sample contributions (``_pieces``) without forming per-sample gradients where a closed form
exists, and the squared norms are multiplied by ``b²``: the result is ``‖g_i‖²`` with
``g_i = ∇_θ l_i``, the gradient of sample ``i``'s own loss, not divided by ``b``.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from neurothermo._data import Batch, as_data, resolve_loss_fn
from neurothermo._state import preserved_state, select_parameters, warn_mode
from neurothermo._types import LossFn
from neurothermo._validate import (
    check_finite_params,
    check_loss_fn,
    check_mean_reduction,
    check_scalar_loss,
)
from neurothermo.gradstats._capture import Recorder, recording
from neurothermo.gradstats._layout import judge, probe_log
from neurothermo.gradstats._pieces import Piece, param_sq_norm
from neurothermo.gradstats._shared import Shared, root_pieces
from neurothermo.gradstats.rules import Use, check_batchnorm
from neurothermo.gradstats.rules._base import _NO_BATCH_AXIS, PerSampleUnsupportedError, judged


@overload
def per_sample_grad_norms(
    model: nn.Module, loss_fn: LossFn, batch: Any, *,
    by_parameter: Literal[False] = False, create_graph: bool = False,
) -> Tensor: ...


@overload
def per_sample_grad_norms(
    model: nn.Module, loss_fn: LossFn, batch: Any, *,
    by_parameter: Literal[True], create_graph: bool = False,
) -> dict[str, Tensor]: ...


@overload
def per_sample_grad_norms(
    model: nn.Module, loss_fn: LossFn, batch: Any, *,
    by_parameter: bool, create_graph: bool = False,
) -> Tensor | dict[str, Tensor]: ...


def per_sample_grad_norms(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    by_parameter: bool = False,
    create_graph: bool = False,
) -> Tensor | dict[str, Tensor]:
    """Squared norms ``‖g_i‖²`` of the per-sample gradients ``g_i = ∇_θ l_i`` of one batch.

    Args:
        model: the network; its trainable parameters (``requires_grad``) are θ. Its state (train
            flags, buffers, ``.grad``) is left exactly as it was, also on error.
        loss_fn: ``loss_fn(model(x), y)`` must be the *mean* over the batch of per-sample losses,
            ``l_B = (1/b) Σ_i l_i`` (e.g. ``nn.CrossEntropyLoss()``; over a sequence or several
            outputs, ``l_i`` is then sample i's mean over them). No parameter penalties inside it.
        batch: data of the data model (``docs/data.md``): one batch ``(inputs, targets)``
            (inputs a tensor or a dict of tensors, samples on the leading axis; with
            ``loss_fn=model_loss`` the inputs alone, the model returning its own mean loss), or an
            iterable of batches (a ``DataLoader``): then the norms of all samples, in order, each
            batch measured on its own (``l_B`` of its own batch; ``g_i`` does not depend on it).
        by_parameter: return ``{name: [b]}`` (names as in ``model.named_parameters()``; a tied
            parameter appears once) instead of their sum.
        create_graph: make the result differentiable w.r.t. the parameters (one double backward
            of ``sum(norms)`` then gives ``∇_θ Σ_i ‖g_i‖²``).

    Returns:
        ``[b]`` (``[N]`` for several batches) tensor of ``‖∇_θ l_i‖²`` — the gradient of sample i's own loss (NOT divided by b:
        the mean-loss gradient is ``(1/b) Σ_i g_i``), in the parameters' dtype; or the dict.

    Exact (never approximate): one forward and one backward of ``l_B`` (``torch.autograd.grad``
    w.r.t. the layer outputs only; no ``.grad`` is written), then per layer: Linear and Hugging
    Face ``Conv1D`` (any leading dims, Gram form ``Σ_{t,s}(a_t·a_s)(δ_t·δ_s)`` or the dense sum,
    whichever is cheaper), Conv1d/2d/3d (Gram form on patches, or one grouped convolution
    backward), Embedding, LayerNorm/GroupNorm/RMSNorm/InstanceNorm/eval-BatchNorm affines,
    Hugging Face's RMSNorm copies (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``,
    ``T5LayerNorm`` …, matched by the source of their forward; ``x̂`` recomputed in float32 as
    they compute it),
    MultiheadAttention (through its projections), LSTM/GRU/RNN (gate deltas at every step, the
    time steps as positions; ``proj_size > 0`` uses the fallback). A module called on an input
    broadcast over the batch (leading dimension 1, e.g. Hugging Face's ``position_ids`` of shape
    ``[1, T]``) is measured on its output expanded to the batch, so each sample gets its own
    rows; so is a module whose output of leading size 1 every sample shares (BART's learned
    positions). An input that folds the batch sample-major with another axis (Swin's windows,
    ``[b·n, …]``, checked by the layout probe below) is exact in Linear, Conv1D, Embedding,
    LayerNorm/RMSNorm and the fallback. A model's own parameters used directly in its forward
    (a ViT's ``cls_token`` and
    ``pos_embed``) are measured op by op when the op broadcasts them over the batch. Any other
    module with parameters uses an exact torch.func path on that module alone (a one-time
    :class:`FallbackWarning`; ``neurothermo.gradstats.register_rule`` adds a closed form). A
    parameter used by several modules or calls (tied weights) has its per-sample gradients added
    before squaring.

    Requirements, as for any per-sample gradient: samples are processed independently (sample i's
    output depends on sample i only) and activations are batch-first. Checked where it can be:
    BatchNorm with batch statistics, fallback modules whose per-sample outputs differ from the
    batch output, non-batch-first layer inputs, parameters used outside their module's forward.
    A layer input whose leading size is ``b`` by coincidence (no batch axis) is found by a layout
    probe, one forward on one sample before the pass (cached per model and input shapes,
    random-number state untouched): the rules refuse it, the fallback holds it constant. A layer
    output every sample shares (T5's ``relative_attention_bias`` on ``[q_len, k_len]`` position
    buckets) is measured where it first meets batch tensors, each sample's gradient pulled back
    to the layer by ``vmap(vjp)``; where it cannot be followed there it is refused, naming it. A parameter-free op that mixes samples
    (``x - x.mean(0)``) cannot be detected.

    Raises:
        ValueError: BatchNorm normalising with batch statistics (train mode): samples interact,
            per-sample gradients are ill-defined — use ``model.eval()`` or GroupNorm/LayerNorm;
            a non-mean ``loss_fn``; a bad batch; activations that are not batch-first; a
            parameter used outside its own module's forward; a loss that ignores θ.
        FloatingPointError: non-finite parameters, loss or norms.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> norms = nt.per_sample_grad_norms(model, loss_fn, (x, y))
        >>> norms.shape
        torch.Size([32])
        >>> by = nt.per_sample_grad_norms(model, loss_fn, (x, y), by_parameter=True)
        >>> sorted(by)
        ['0.bias', '0.weight', '2.bias', '2.weight']
        >>> torch.allclose(sum(by.values()), norms)
        True
    """
    warn_mode(model, None, "per_sample_grad_norms", batchnorm=False)
    params = prepare(model, loss_fn)
    parts = []
    with preserved_state(model):
        for i, b in enumerate(as_data(batch, loss_fn, name="batch", model=model)):
            parts.append(stats_of_batch(model, loss_fn, b, params, create_graph=create_graph,
                                        probe_reduction=i == 0).sq_norms)
    sq = parts[0] if len(parts) == 1 else {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
    if by_parameter:
        return sq
    return torch.stack(list(sq.values())).sum(0)


@dataclass(frozen=True)
class BatchGradStats:
    """``sq_norms[name]``: ``[b]`` of ``‖g_i‖²`` restricted to that parameter; ``mean_grad[name]``:
    the batch-mean gradient ``∇_θ l_B`` (when asked for); ``loss``: ``l_B``."""

    sq_norms: dict[str, Tensor]
    mean_grad: dict[str, Tensor] | None
    loss: Tensor


def prepare(model: nn.Module, loss_fn: LossFn) -> dict[str, Tensor]:
    """Validate ``model`` and ``loss_fn`` once; return the trainable parameters by name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_loss_fn(loss_fn)
    check_batchnorm(model)
    return select_parameters(model)


def stats_of_batch(model: nn.Module, loss_fn: LossFn, batch: Batch,
                   params: dict[str, Tensor], *, create_graph: bool = False,
                   mean_grad: bool = False, check_finite: bool = True,
                   probe_reduction: bool = False) -> BatchGradStats:
    """Per-parameter per-sample squared norms (and the mean gradient) of one checked batch, one
    backward (the caller preserves the model's state). ``check_finite=False`` leaves the
    finiteness check of the norms to the caller. ``probe_reduction``: also evaluate ``loss_fn``
    on the outputs repeated twice, to refuse a loss that sums over the batch (one extra loss
    evaluation, no model pass: see ``_validate.check_mean_reduction``)."""
    wanted = frozenset(id(p) for p in params.values())
    clone, expand = False, True
    while True:
        try:
            stats = _measure(model, loss_fn, batch, params, wanted, clone, create_graph,
                             mean_grad, expand, probe_reduction)
        except _ExpandedBroadcastFailed:
            expand = False  # measure again without expansion: the rule then names the module
            continue
        if stats is not None:
            if check_finite:
                check_finite_norms(model, stats.sq_norms.values())
            return stats
        if clone:
            raise AssertionError("unreachable: the clone pass always returns")
        clone = True


class _ExpandedBroadcastFailed(Exception):
    """The forward failed after outputs of broadcast inputs were expanded to the batch."""


def check_finite_norms(model: nn.Module, norms: Iterable[Tensor]) -> None:
    """Raise (naming a non-finite parameter if there is one) unless all ``norms`` are finite."""
    if not bool(torch.stack([torch.isfinite(n).all() for n in norms]).all()):
        check_finite_params(model)
        raise FloatingPointError("per-sample gradient norms are not finite (overflow?)")


def _measure(model: nn.Module, loss_fn: LossFn, batch: Batch, params: dict[str, Tensor],
             wanted: frozenset[int], clone: bool, create_graph: bool, mean_grad: bool,
             expand: bool = True, probe: bool = False) -> BatchGradStats | None:
    b = batch.size
    if b == 1:  # one sample: its gradient is the batch's, whatever the model's layout
        return _one_sample(model, loss_fn, batch, params, create_graph, mean_grad)
    rec = Recorder(b, wanted, clone=clone, create_graph=create_graph,
                   names={id(p): n for n, p in params.items()}, expand_broadcast=expand)
    seen = probe_log(model, batch)
    if seen is not None:  # outputs every sample shares are then followed (_shared.py)
        rec.shared, rec.probe_out = Shared(b), seen.out_log
    with torch.enable_grad():
        with recording(model, rec):
            try:
                outputs = batch.outputs(model)
                loss = resolve_loss_fn(loss_fn)(outputs, batch.targets)
            except Exception as e:
                if rec.expanded:
                    raise _ExpandedBroadcastFailed from e
                raise
        try:
            loss = check_scalar_loss(loss)
        except FloatingPointError:
            check_finite_params(model)  # name a non-finite parameter if that is the cause
            raise
        if probe:
            check_mean_reduction(resolve_loss_fn(loss_fn), outputs, batch.targets, loss)
        del outputs
        rec.active = False
        if rec.stray:
            where = "; ".join(f"{p!r} in {m!r}" for p, m in sorted(rec.stray.items()))
            raise PerSampleUnsupportedError(
                f"parameters are used outside the forward of the module that owns them ({where}): "
                "their per-sample gradients cannot be attributed to a layer rule. Use each "
                "parameter only through its own module (tie weights by sharing the Parameter "
                "between modules, e.g. head.weight = emb.weight), and keep penalties out of "
                "loss_fn; where the model's code cannot change (a library passing a layer's "
                "weight to its own kernel), leave those parameters out of θ "
                "(requires_grad_(False)): the norms of the rest are then exact."
            )
        twice = rec.adopted_twice()
        if twice:
            raise PerSampleUnsupportedError(
                f"parameters {twice} are used both through their own module and directly in "
                f"the forward of {sorted(set(rec.adopted.values()))}: the two uses cannot be "
                "told apart. Use each parameter only through its own module, or leave them "
                "out of θ (requires_grad_(False))."
            )
        changed = rec.modified_in_place()
        if changed and not clone:
            return None  # an in-place op changed a recorded tensor: redo with copies
        if changed:
            raise RuntimeError(f"tensors recorded at modules {changed} were modified in place")
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on any trainable parameter (does loss_fn or the model "
                "detach its output?); per-sample gradients would all be zero"
            )
        _shared_uses(rec)
        edges = list({_key(e): e for u in rec.uses for e in u.targets}.values())
        plist = list(params.values())
        inputs: list[Any] = [*edges, *(plist if mean_grad else [])]
        grads = (torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph)
                 if inputs else ())
        delta: dict[tuple[int, int], Tensor | None] = {
            _key(e): g for e, g in zip(edges, grads)}
        mean_grads = grads[len(edges):]
        del edges, inputs, grads
        layout = judge(rec.inputs, b, seen)
        rec.inputs.clear()
        with torch.set_grad_enabled(create_graph), judged(layout.batchless, layout.folded, layout.axes):
            norms = _evaluate(rec.uses, delta)
            sq = {n: norms[id(p)] * (b * b) if id(p) in norms else p.new_zeros(b)
                  for n, p in params.items()}
    mg = None
    if mean_grad:
        mg = {n: (g if g is not None else torch.zeros_like(p))
              for (n, p), g in zip(params.items(), mean_grads)}
    return BatchGradStats(sq, mg, loss if create_graph else loss.detach())


def _one_sample(model: nn.Module, loss_fn: LossFn, batch: Batch, params: dict[str, Tensor],
                create_graph: bool, mean_grad: bool) -> BatchGradStats:
    """``b = 1``: ``g_1 = ∇l_B``, one plain backward (no layer rule, so no layout to read)."""
    with torch.enable_grad():
        loss = check_scalar_loss(resolve_loss_fn(loss_fn)(batch.outputs(model), batch.targets))
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on any trainable parameter (does loss_fn or the model "
                "detach its output?); per-sample gradients would all be zero")
        plist = list(params.values())
        grads = torch.autograd.grad(loss, plist, allow_unused=True, create_graph=create_graph)
    full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, plist)]
    sq = {n: g.square().sum().reshape(1) for n, g in zip(params, full)}
    mg = dict(zip(params, full)) if mean_grad else None
    return BatchGradStats(sq, mg, loss if create_graph else loss.detach())


def _shared_uses(rec: Recorder) -> None:
    """A :class:`Use` per module whose output every sample shares, read where it meets the
    batch (``_shared.py``); or its refusal, naming it, why, and the way out."""
    if rec.shared is None:
        return
    b = rec.batch_size
    for root in rec.shared.roots:
        why = root.bad or ("its output never meets the batch" if not root.meetings else None)
        if why is not None:
            raise PerSampleUnsupportedError(
                f"module {root.name!r} ({type(root.module).__name__}) gives an output every "
                f"sample shares (no batch axis), which could not be followed to where it meets "
                f"the batch: {why}. " + _NO_BATCH_AXIS)
        own = frozenset(id(p) for p in root.module.parameters(recurse=False)) & rec.wanted

        def compute(deltas: list[Tensor | None], r: Any = root) -> list[Piece]:
            return root_pieces(r, deltas, rec.wanted, b)

        rec.uses.append(Use(root.name, [m[0] for m in root.meetings], compute, [], own))


def _key(edge: GradientEdge) -> tuple[int, int]:
    return id(edge.node), edge.output_nr


def _evaluate(uses: list[Use], delta: dict[tuple[int, int], Tensor | None]
              ) -> dict[int, Tensor]:
    """``‖Σ pieces‖²`` per parameter id (before the factor b²), consuming ``uses`` and ``delta``.

    Uses are evaluated in forward order; a parameter is reduced to its norm as soon as all uses
    that may contribute to it are in, and recorded tensors and output gradients are released as
    soon as nothing needs them, so the peak memory stays near one layer's worth of temporaries.
    """
    remaining = Counter(pid for u in uses for pid in u.params)
    need = Counter(_key(e) for u in uses for e in u.targets)
    waiting: dict[int, list[Piece]] = {}
    out: dict[int, Tensor] = {}
    uses.reverse()
    while uses:
        use = uses.pop()
        ds = [delta.get(_key(e)) for e in use.targets]
        for e in use.targets:
            need[_key(e)] -= 1
            if need[_key(e)] == 0:
                delta.pop(_key(e), None)
        declared, compute, name = use.params, use.compute, use.name
        del use
        for piece in compute(ds):
            if id(piece.param) not in declared:
                raise ValueError(f"the rule for module {name!r} returned a piece for a parameter "
                                 "that is not its own (rules cover their module's parameters)")
            waiting.setdefault(id(piece.param), []).append(piece)
        del ds, compute
        for pid in declared:
            remaining[pid] -= 1
            if remaining[pid] == 0 and pid in waiting:
                pieces = waiting.pop(pid)
                out[pid] = param_sq_norm(pieces[0].param, pieces)
    assert not waiting, "every piece is for a declared parameter, reduced after its last use"
    return out
