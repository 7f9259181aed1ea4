"""Model state helpers: parameter selection, restoring a model exactly as it was, the train/eval
mode of a measurement and the attention kernels of second-order measurements.

Measurements (entropic terms, Hessian products, per-sample norms) run extra forward passes. They
must never change training: BatchNorm running statistics, the train/eval flags and parameter
``.grad`` fields are restored exactly on exit, also when the measurement raises.

Mode rule (the same for every function with a ``mode`` argument, docs/conventions.md): ``mode=None``
(the default) measures the model as it is, in its current train/eval flags; ``mode="train"`` or
``"eval"`` sets every module's flag for the measurement and restores it after. A ``ModeWarning``
says when the answer depends on that choice and it was not made explicitly (BatchNorm in train mode
uses batch statistics, in eval mode its running ones), and whenever active Dropout makes the result
random.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

ParamFilter = Callable[[str, Tensor], bool] | list[str] | tuple[str, ...] | str | None


def select_parameters(model: nn.Module, param_filter: ParamFilter = None) -> dict[str, Tensor]:
    """Trainable parameters of ``model`` (``requires_grad``) by name, optionally filtered.

    ``param_filter`` is ``None`` (all), a name prefix string, a list of names / prefixes, or a
    predicate ``(name, tensor) -> bool``. Raises if nothing matches.
    """
    params: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if param_filter is None:
        chosen = params
    elif callable(param_filter):
        chosen = {n: p for n, p in params.items() if param_filter(n, p)}
    else:
        keys = [param_filter] if isinstance(param_filter, str) else list(param_filter)
        chosen = {
            n: p for n, p in params.items()
            if any(n == k or n.startswith(k + ".") for k in keys)
        }
    if not chosen:
        raise ValueError(
            f"no trainable parameters match param_filter={param_filter!r}; "
            f"available: {sorted(params)[:20]}"
        )
    return chosen


def _buffers_of_stateful_modules(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_buffers())


@contextmanager
def preserved_state(model: nn.Module, mode: str | None = None) -> Iterator[nn.Module]:
    """Run a block on ``model`` and restore buffers, train/eval flags and ``.grad`` afterwards.

    Within the block the parameters have no ``.grad`` (the caller's are set aside and put back).

    ``mode`` is ``"train"``, ``"eval"`` or ``None`` (keep the current mode) for the block.
    """
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
    flags = {m: m.training for m in model.modules()}
    buffers = {n: b.detach().clone() for n, b in _buffers_of_stateful_modules(model).items()}
    # The caller's gradients are set aside, not copied: inside the block every ``.grad`` is None,
    # so a backward there writes fresh tensors and cannot accumulate into the caller's (a copy of
    # every gradient per call cost more than some of the blocks it protects).
    grads = {n: p.grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    if mode is not None:
        model.train(mode == "train")
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for n, b in _buffers_of_stateful_modules(model).items():
                # Copy back only what changed: an in-place copy bumps the buffer's version counter,
                # which breaks a later backward through a graph that saved it (eval-mode BatchNorm
                # saves its running statistics; create_graph=True results outlive this block).
                if n in buffers and not torch.equal(b, buffers[n]):
                    b.copy_(buffers[n])
        for n, p in model.named_parameters():
            p.grad = grads.get(n)


def has_train_mode_batchnorm(model: nn.Module) -> str | None:
    """Name of the first BatchNorm module in train mode, or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return name or type(m).__name__
    return None


class ModeWarning(UserWarning):
    """A measurement depends on the model's train/eval mode, or active Dropout makes it random."""


MODES = (None, "train", "eval")


def check_mode(mode: str | None) -> str | None:
    """``mode`` validated: ``None`` (the model's current flags), ``"train"`` or ``"eval"``."""
    if mode not in MODES:
        raise ValueError(f"mode must be None (the model's current mode), 'train' or 'eval', got {mode!r}")
    return mode


def _functional_dropout(m: nn.Module) -> str | None:
    """The attribute of a module that applies dropout as a function with a probability it
    holds as a float (``F.dropout(w, p=self.attention_dropout, training=self.training)`` or
    ``scaled_dot_product_attention(..., dropout_p=self.dropout)``: Hugging Face's Llama,
    Mistral, Qwen, ViT attention in transformers ≥ 5), when that probability is > 0."""
    for k, v in vars(m).items():
        if "drop" in k.lower() and isinstance(v, float) and not isinstance(v, bool) and v > 0:
            return f"{k}={v:g}"
    return None


def active_dropout(model: nn.Module) -> list[str]:
    """Names of the modules that draw random masks in their current flags, in train mode:
    ``nn.Dropout*`` with ``p > 0``, ``nn.MultiheadAttention`` with ``dropout > 0``, multi-layer
    RNNs with ``dropout > 0``, and any other module holding a float attribute named ``*drop*``
    that is > 0 (functional dropout, as Hugging Face attention applies it; listed with it)."""
    names = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        label = name or type(m).__name__
        if isinstance(m, nn.modules.dropout._DropoutNd):
            p = m.p
        elif isinstance(m, nn.MultiheadAttention | nn.RNNBase):
            p = m.dropout if not isinstance(m, nn.RNNBase) or m.num_layers > 1 else 0.0
        else:
            attr = _functional_dropout(m)
            if attr is not None:
                names.append(f"{label} ({attr})")
            continue
        if p > 0:
            names.append(label)
    return names


def _train_mode_batchnorm(model: nn.Module) -> list[str]:
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _listed(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def warn_mode(model: nn.Module, mode: str | None, what: str, *, fixed_masks: bool = False,
              batchnorm: bool = True, stacklevel: int = 3) -> None:
    """Issue the ``ModeWarning``s of a measurement ``what`` run on ``model`` in ``mode``.

    Call it before the measurement changes any flag. Two cases: ``mode=None`` with BatchNorm in
    train mode (the value uses batch statistics; ``mode="eval"`` would give another value), and
    active Dropout in the mode the measurement runs in (the value is random; with ``fixed_masks``
    the masks come from a fixed seed, so it is reproducible but depends on that seed).
    ``batchnorm=False`` skips the first (a function without a ``mode`` argument, used in training).
    """
    check_mode(mode)
    if not isinstance(model, nn.Module):
        return  # the measurement's own check names the problem
    if batchnorm and mode is None and (bn := _train_mode_batchnorm(model)):
        warnings.warn(
            f"{what} measures the model in its current mode: BatchNorm {_listed(bn)} is in train "
            "mode and normalises with the statistics of this batch; mode='eval' (running "
            "statistics) gives a different value. Pass mode='train' or mode='eval' to choose "
            "explicitly", ModeWarning, stacklevel=stacklevel)
    flags = {m: m.training for m in model.modules()}
    if mode is not None:
        model.train(mode == "train")
    try:
        drop = active_dropout(model)
    finally:
        for m, flag in flags.items():
            m.training = flag
    if drop:
        how = ("its dropout masks are drawn from a fixed seed, so the value is reproducible but "
               "depends on that seed" if fixed_masks else
               "two identical calls give different values")
        warnings.warn(
            f"{what} runs with active Dropout in {_listed(drop)} (train mode, p > 0): the result "
            f"is random ({how}). For the deterministic function call model.eval() or pass "
            "mode='eval'; to keep dropout fix the masks with torch.manual_seed before each call",
            ModeWarning, stacklevel=stacklevel)


@contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """``nn.MultiheadAttention``'s and torch's transformer layers' fused inference path off for
    the block (``torch.backends.mha``); the caller's flag is restored on exit, also on error."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextmanager
def double_backward_attention() -> Iterator[None]:
    """Attention kernels with a second derivative for the block; the caller's choice is restored.

    The fused kernels of ``F.scaled_dot_product_attention`` (flash and memory-efficient, on CPU and
    CUDA, and cuDNN) have a first derivative only, so a Hessian-vector product through them raises.
    Inside the block only the math backend is enabled (the same function, computed from matmul and
    softmax, twice differentiable) and ``nn.MultiheadAttention``'s fused inference path is off.
    Every second-order measurement runs inside this block; on exit the caller's SDPA backend
    selection and the MHA fast-path flag are back as they were.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with mha_fastpath_off(), sdpa_kernel(SDPBackend.MATH), composite_weight_norm():
            yield
    except (NotImplementedError, RuntimeError) as err:
        raise _no_double_backward(err) from err


def _weight_norm_composite(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``g · v / ‖v‖`` (norm over every axis but ``dim``), from twice-differentiable ops."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


@contextmanager
def composite_weight_norm() -> Iterator[None]:
    """Weight normalisation computed from elementary ops for the block; torch's restored after.

    torch's fused ``torch._weight_norm`` (used by ``nn.utils.parametrizations.weight_norm`` and
    the older ``nn.utils.weight_norm``, e.g. in Wav2Vec2's positional convolution) has a wrong
    second derivative in torch 2.13 (``gradgradcheck`` fails; a Hessian-vector product through it
    was 1.4e-2 off on the weight's direction parameter, silently). The same function written as
    ``v · g / norm_except_dim(v)`` has the right one, and the same values to round-off.
    """
    import sys

    legacy = sys.modules.get("torch.nn.utils.weight_norm")
    homes: list[Any] = [torch] + ([legacy] if hasattr(legacy, "_weight_norm") else [])
    saved = [getattr(home, "_weight_norm") for home in homes]  # noqa: B009 (private names)
    for home in homes:
        setattr(home, "_weight_norm", _weight_norm_composite)  # noqa: B010
    try:
        yield
    finally:
        for home, fn in zip(homes, saved):
            setattr(home, "_weight_norm", fn)  # noqa: B010


# torch's message for an op whose backward has no derivative of its own
_NO_DERIVATIVE = re.compile(r"^(?:the )?derivative for '?(?:aten::)?([\w.]+)'? is not implemented")
# the layers known to hit it, with the way round them
_LAYER_OF_OP = {
    "_embedding_bag_backward": "nn.EmbeddingBag (replace it by nn.Embedding followed by a sum or "
                               "mean over each bag, which is twice differentiable)",
    "_embedding_bag_dense_backward": "nn.EmbeddingBag (replace it by nn.Embedding followed by a "
                                     "sum or mean over each bag, which is twice differentiable)",
}


def _no_double_backward(err: BaseException) -> BaseException:
    """``err`` itself, or, when it is torch's "derivative for <op> is not implemented" raised
    by a second derivative, the same error type with a message that names the op, the layer
    where it is known, and the ways out."""
    m = _NO_DERIVATIVE.match(str(err))
    if m is None:
        return err
    op = m.group(1)
    layer = _LAYER_OF_OP.get(op)
    where = f" It is the backward of {layer}." if layer else ""
    return type(err)(
        f"this measurement needs a second derivative (a double backward), and PyTorch has none "
        f"for '{op}'.{where} Ways out: for hvp, top_eigenvalues, hessian_trace and "
        "SharpnessTracker pass method='finite_difference' (first derivatives only); or leave "
        "that layer's parameters out of θ (param_filter in the curvature functions, "
        "requires_grad_(False) for the entropic ones), so nothing differentiates through its "
        f"backward twice. (PyTorch: {err})")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def low_precision_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters stored in float16 or bfloat16."""
    if not isinstance(model, nn.Module):
        return []
    return [n for n, p in model.named_parameters() if p.requires_grad and p.dtype in LOW_PRECISION]


@contextmanager
def float32_copy(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` itself, or a float32 copy of it when it has float16/bfloat16 parameters.

    Second-order quantities of a low-precision model are computed on the copy: its weights are the
    model's exact values (bfloat16 and float16 embed exactly in float32), the arithmetic (forward,
    backward, double backward, the eigensolver's orthogonalisation) is float32. Low-precision
    arithmetic would give eigenvalues off by the rounding of every intermediate (≈ 20 % measured on
    an MLP in bfloat16) with nothing to flag it. The copy shares nothing with the model; the caller
    casts floating inputs to float32 (``as_float32``).
    """
    if not low_precision_parameters(model):
        yield model
        return
    import copy

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.grad = None
    clone.float()
    try:
        yield clone
    finally:
        del clone


def as_float32(t: Any) -> Any:
    """``t`` with every float16/bfloat16 tensor in float32 (a tensor, or tensors in tuples, lists
    and mappings); anything else unchanged."""
    if isinstance(t, Tensor):
        return t.float() if t.dtype in LOW_PRECISION else t
    if isinstance(t, tuple | list):
        return type(t)(as_float32(u) for u in t)
    if isinstance(t, Mapping):
        return {k: as_float32(u) for k, u in t.items()}
    return t


def frozen_rows(model: nn.Module) -> dict[str, int]:
    """``{weight name: padding_idx}`` of the ``nn.Embedding`` layers whose padding row never trains.

    That row is used in the forward pass but its gradient is set to zero, so it never trains, and
    the "gradient" autograd returns is not the gradient of the loss: reverse-over-reverse products
    then give ``Jᵀv`` of the masked gradient's Jacobian ``J`` and forward-over-reverse ``Jv``, two
    different non-symmetric answers. Second-order measurements take the Hessian over the trainable
    entries only, ``P H P`` with ``P`` zeroing those rows (symmetric, and what every method agrees
    on), by zeroing the rows in the vectors and in the results.

    A weight shared with any other module (an output head tied to the input embedding, as in
    BART, Whisper, Marian: ``lm_head.weight is embed.weight``), or with an embedding of another
    ``padding_idx``, trains in that row through its other uses: it is not frozen, and masking it
    would make every second-order result wrong by the row's share. Limitation: a weight used by
    an op outside any module that owns it (``h @ self.embed.weight.T`` in a parent's forward)
    cannot be seen here; share the Parameter with a module instead (the per-sample functions
    require that anyway).
    """
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for local, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((m, local))
    rows, seen = {}, set()
    for mod_name, m in model.named_modules():
        if not (isinstance(m, nn.Embedding) and m.padding_idx is not None
                and m.weight.requires_grad) or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))  # named once, as named_parameters() names it
        if all(isinstance(o, nn.Embedding) and local == "weight" and o.padding_idx == m.padding_idx
               for o, local in owners.get(id(m.weight), [])):
            rows[f"{mod_name}.weight" if mod_name else "weight"] = int(m.padding_idx)
    return rows


def zero_frozen_rows(tensors: Mapping[str, Tensor], rows: Mapping[str, int]) -> None:
    """Zero, in place, the frozen rows (``frozen_rows``) of the entries of ``tensors`` named there."""
    with torch.no_grad():
        for name, idx in rows.items():
            if name in tensors:
                tensors[name][idx] = 0
