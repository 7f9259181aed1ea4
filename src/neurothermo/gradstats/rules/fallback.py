"""Any other module with parameters: exact per-sample gradients by torch.func on that module alone.

For a recorded call with input ``x`` and output gradient ``δ`` the module's *own* parameters θ get
``c_i = ∇_θ ⟨δ_i, f(θ, x_i)⟩`` (``vmap`` over samples of ``torch.func.grad``; the module runs on one
sample at a time, as a batch of one). Children are recorded by their own hooks, so their parameters
are constants here. This materialises ``b × |θ|`` for this module only.

Never a silently wrong number: the per-sample outputs must reproduce the recorded batch output, so
a module that mixes samples (batch statistics) or draws random numbers (dropout in train mode) is
rejected with an error. One warning (:class:`FallbackWarning`) per module instance names it.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from neurothermo.gradstats._pieces import Dense, Piece
from neurothermo.gradstats.rules._base import (
    _NO_BATCH_AXIS,
    Call,
    PerSampleUnsupportedError,
    batchless_size,
    fold_of,
)


class FallbackWarning(UserWarning):
    """A module without a closed-form rule is handled by the slower torch.func path."""


_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def tensor_leaves(tree: Any) -> list[Tensor]:
    """The tensors of a pytree, in pytree order (plain tensors and flat tuples without pytree)."""
    if isinstance(tree, Tensor):
        return [tree]
    if type(tree) in (tuple, list) and all(isinstance(x, Tensor | None) for x in tree):
        return [x for x in tree if x is not None]
    return [x for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]


def _batch_dim(full: Tensor, probe: Tensor, b: int) -> int | None:
    """The axis of ``full`` that is the batch axis, judged against a one-sample ``probe``."""
    if full.dim() != probe.dim():
        return None
    for d in range(full.dim()):
        if full.shape[d] == b and probe.shape[d] == 1 and all(
            full.shape[k] == probe.shape[k] for k in range(full.dim()) if k != d
        ):
            return d
    return None


def _fold_rows(full: Tensor, probe: Tensor, b: int) -> int:
    """``m`` when ``full`` is ``[b·m, …]`` against a one-sample ``probe`` of ``[m, …]`` with the
    same trailing shape (a sample-major fold: the module ran on the m rows of one sample), else 0.
    """
    m = probe.shape[0] if probe.dim() else 0
    return m if (m > 1 and full.dim() == probe.dim() and full.shape[0] == m * b
                 and full.shape[1:] == probe.shape[1:]) else 0


def fallback_pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    """Pieces of the module's direct parameters (``deltas`` follow the output's tensor leaves).

    The exact generic rule: ``torch.func`` ``vmap`` over the samples of the module's forward,
    pulling each sample's output gradient back to the module's own parameters (``deltas`` are
    gradients of the mean batch loss ``l_B``, so each piece is sample i's share of ``∇l_B``).
    Used for every module without a registered :class:`Rule`, once with a
    :class:`FallbackWarning` per module.

    Args:
        call: the recorded :class:`Call` of the module.
        deltas: ``∂l_B/∂(output leaf j)`` per tensor leaf of the output, None where a leaf does
            not reach the loss.

    Returns:
        One piece per wanted direct parameter (empty when none is wanted or no delta is given).

    Raises:
        ValueError: the module has no batch-first tensor input, or the batch axis of an output
            cannot be found.

    Warns:
        FallbackWarning: the first time a module instance takes this path.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from neurothermo.gradstats import Rule
        >>> from neurothermo.gradstats.rules import fallback_pieces
        >>> rule = Rule(fallback_pieces)  # the rule every module without one gets
        >>> rule.pieces is fallback_pieces
        True
    """
    m, name, b = call.module, call.name, call.batch_size
    params: dict[str, Tensor] = {n: p for n, p in m.named_parameters(recurse=False)
                                 if id(p) in call.wanted}
    params.update((n, p) for n, p in call.adopted if id(p) in call.wanted)
    if not params or all(d is None for d in deltas):
        return []
    if m not in _WARNED:
        _WARNED.add(m)
        warnings.warn(
            f"per-sample gradients: module {name!r} ({type(m).__name__}) has no closed-form rule"
            "; using the exact torch.func fallback on this module (vmap over samples, "
            f"b × {sum(p.numel() for p in params.values())} numbers). Register a rule with "
            "neurothermo.gradstats.register_rule to make it fast.",
            FallbackWarning,
            stacklevel=2,
        )
    keep = torch.is_grad_enabled()  # create_graph: stay differentiable w.r.t. everything

    def det(t: Tensor) -> Tensor:
        return t if keep else t.detach()

    leaves, spec = tree_flatten((call.args, call.kwargs))
    # inputs the layout probe found batch-less (leading size b by coincidence) are constants;
    # a sample-major fold [b·m, …] gives each sample its m rows (a batch of m for the module)
    rows = [fold_of(x) if isinstance(x, Tensor) else 1 for x in leaves]
    batched = [isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == r * b
               and batchless_size(x) is None for x, r in zip(leaves, rows)]
    if not any(batched):
        raise PerSampleUnsupportedError(
            f"module {name!r} ({type(m).__name__}) has no batch-first tensor input (dim 0 = the "
            f"{b} samples), so its per-sample gradients cannot be computed. " + _NO_BATCH_AXIS
        )
    theta = {n: det(p) for n, p in params.items()}
    outs = tensor_leaves(call.output)
    with torch.no_grad():
        first = [x[:r] if bt else x for x, bt, r in zip(leaves, batched, rows)]
        a1, k1 = tree_unflatten(first, spec)
        try:
            probe = tensor_leaves(functional_call(m, theta, tuple(a1), k1))
        except Exception as e:  # e.g. a cache argument holding the whole batch's state
            raise _no_torch_func(name, m, e) from e
    used = [(j, d) for j, d in enumerate(deltas) if d is not None]
    dims, folds = [], []  # folds[j]: rows per sample of a folded output (then dims[j] = 0), else 0
    for j, _ in used:
        dim = _batch_dim(outs[j], probe[j], b) if j < len(probe) else None
        fold = _fold_rows(outs[j], probe[j], b) if dim is None and j < len(probe) else 0
        if fold:
            dim = 0
        if dim is None:
            raise PerSampleUnsupportedError(
                f"module {name!r} ({type(m).__name__}): cannot find the batch axis of output "
                f"{j} (shape {tuple(outs[j].shape)}); per-sample gradients need outputs that "
                "carry the sample axis. " + _NO_BATCH_AXIS
            )
        dims.append(dim)
        folds.append(fold)
    consts = [None if bt else x for x, bt in zip(leaves, batched)]

    def f(th: dict[str, Tensor], xs: list[Tensor], ds: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        it = iter(xs)
        full = [(next(it).unsqueeze(0) if r == 1 else next(it)) if bt else c
                for c, bt, r in zip(consts, batched, rows)]
        args, kwargs = tree_unflatten(full, spec)
        o = tensor_leaves(functional_call(m, th, tuple(args), kwargs))
        picked = [o[j] for j, _ in used]
        total = sum((oj * (dj if fold else dj.unsqueeze(dim))).sum()
                    for oj, dj, dim, fold in zip(picked, ds, dims, folds))
        assert isinstance(total, Tensor)
        return total, picked

    xs = [det(x if r == 1 else x.reshape(b, r, *x.shape[1:]))
          for x, bt, r in zip(leaves, batched, rows) if bt]
    ds = [det(d if not fold else d.reshape(b, fold, *d.shape[1:]))
          for (_, d), fold in zip(used, folds)]
    try:
        grads, per_sample_out = vmap(grad(f, has_aux=True), in_dims=(None, 0, dims),
                                     randomness="different")(theta, xs, ds)
    except RuntimeError:
        # vmap cannot batch some modules (in-place ops on internal unbatched tensors, e.g. a
        # projected LSTM): the same exact gradients, one sample at a time.
        try:
            grads, per_sample_out = _loop(f, theta, xs, ds, dims, b)
        except RuntimeError as e:
            raise _no_torch_func(name, m, e) from e
    for (j, _), dim, fold, got in zip(used, dims, folds, per_sample_out):
        out = outs[j].detach()
        ref = out.reshape(b, fold, *out.shape[1:]) if fold else out.movedim(dim, 0)
        got = got.detach() if fold else got.detach().select(dim + 1, 0)
        tol = math.sqrt(torch.finfo(ref.dtype).eps) if ref.is_floating_point() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if not torch.allclose(got, ref, rtol=tol, atol=tol * max(scale, 1e-30)):
            raise PerSampleUnsupportedError(
                f"module {name!r} ({type(m).__name__}) evaluated one sample at a time does not "
                "reproduce its batch output: a sample's output depends on the other samples "
                "(batch statistics) or on random numbers (dropout in train mode), so its "
                "per-sample gradients are ill-defined. Use model.eval() or a per-sample variant "
                "of the module, or register a rule for it (neurothermo.gradstats.register_rule)."
            )
    return [Piece(p, Dense(grads[n])) for n, p in params.items()]


def _loop(f: Any, theta: dict[str, Tensor], xs: list[Tensor], ds: list[Tensor], dims: list[int],
          b: int) -> tuple[dict[str, Tensor], list[Tensor]]:
    """``vmap(grad(f))`` as a loop over the ``b`` samples (same values, stacked)."""
    rows = [grad(f, has_aux=True)(theta, [x[i] for x in xs], [d.select(k, i) for d, k in
                                                              zip(ds, dims)])
            for i in range(b)]
    grads = {n: torch.stack([r[0][n] for r in rows]) for n in theta}
    outs = [torch.stack([r[1][j] for r in rows]) for j in range(len(rows[0][1]))]
    return grads, outs


def _no_torch_func(name: str, m: nn.Module, e: Exception) -> PerSampleUnsupportedError:
    return PerSampleUnsupportedError(
        f"module {name!r} ({type(m).__name__}) has no closed-form rule and torch.func cannot "
        f"evaluate it one sample at a time ({type(e).__name__}: {str(e)[:200]}). If it takes a "
        "cache or another argument holding the whole batch's state (Hugging Face: call the "
        "model with use_cache=False), remove it; else register a rule for it with "
        "neurothermo.gradstats.register_rule, or leave its parameters out of θ "
        "(module.requires_grad_(False))."
    )
