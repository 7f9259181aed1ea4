"""Input checks shared by every public function.

Each check raises an error that names the offending value and says how to fix it: bad input must
never turn into a NaN or a silently wrong number further down.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``value`` as float, or raise if it is not a finite positive number (bools refused:
    ``lr=True`` is a mistake, not 1.0)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got the bool {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


def check_int(name: str, value: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer in ``[minimum, maximum]``, else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name} must be >= {minimum}{hi}, got {value}")
    return value


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf.

    A finite sum proves it (NaN and ±Inf propagate through a sum) at the cost of one reduction,
    ~50× cheaper than ``isfinite(t).all()`` on large tensors; only a non-finite sum (NaN/Inf
    present, or an overflowing sum of finite values) pays for the elementwise check.
    """
    if t.is_meta:
        raise ValueError(
            "a tensor is on the 'meta' device (shape only, no values): materialise the model first, "
            "e.g. model.to_empty(device='cpu') and load_state_dict(...), or build it outside "
            "torch.device('meta')")
    with torch.no_grad():
        if bool(torch.isfinite(t.sum())):
            return True
        return bool(torch.isfinite(t).all())


def check_loss_fn(loss_fn: Callable[..., Tensor] | None) -> None:
    """Reject loss functions that declare a non-mean reduction.

    What can be seen is checked: a ``reduction`` attribute (``nn.MSELoss(reduction="sum")``) and
    the ``reduction=`` keyword of a ``functools.partial`` (nested partials too). A plain function
    that sums inside cannot be seen without evaluating it; :func:`check_mean_reduction` probes
    such a loss on outputs the caller already has.

    neurothermo's convention (docs/theory.md): ``loss_fn(outputs, targets)`` returns the *mean* of the
    per-sample losses over the batch, ``l_B = (1/b) Σ_i l_i``. A sum-reduced loss would scale
    every gradient by b and every entropic term by b², silently.
    """
    if loss_fn is None:  # the model returns its own loss (neurothermo._data.model_loss)
        return
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", None)
    inner = loss_fn
    while reduction is None and isinstance(inner, functools.partial):
        # functools.partial(F.cross_entropy, reduction="sum"): the keyword is all there is to see
        reduction = inner.keywords.get("reduction", getattr(inner.func, "reduction", None))
        inner = inner.func
    if reduction is not None and reduction != "mean":
        raise ValueError(
            f"loss_fn has reduction={reduction!r}; neurothermo expects a mean-reduced loss "
            "l_B = (1/b) Σ_i l_i (e.g. nn.CrossEntropyLoss() or nn.MSELoss() with the default "
            "reduction='mean'). With 'sum' every gradient is b times too large."
        )


def check_mean_reduction(loss_fn: Callable[..., Tensor], outputs: Any, targets: Any,
                         loss: Tensor) -> None:
    """Probe a loss for sum reduction: ``loss_fn`` on the batch repeated twice equals ``loss`` under
    mean reduction and ``2·loss`` under sum reduction.

    Costs one evaluation of ``loss_fn`` on detached outputs (no model forward, no graph). Skipped
    when outputs/targets are not tensors with the batch on axis 0, or when ``loss`` is ~0 (the
    probe cannot tell then). Raises ValueError for a loss that doubles.
    """
    if not (isinstance(outputs, Tensor) and isinstance(targets, Tensor)) or outputs.ndim == 0:
        return
    with torch.no_grad():
        l1 = loss.detach().to(torch.float64)
        try:
            l2 = loss_fn(torch.cat([outputs.detach()] * 2), torch.cat([targets] * 2))
        except Exception:  # a loss that cannot take a doubled batch is not probed
            return
        if not isinstance(l2, Tensor) or l2.ndim != 0:
            return
        l2 = l2.detach().to(torch.float64)
        scale = float(l1.abs())
        if scale > 1e-12 and abs(float(l2) - 2 * float(l1)) <= 1e-4 * scale < abs(float(l2 - l1)):
            raise ValueError(
                "loss_fn sums over the batch: on the batch repeated twice it returns twice the "
                f"loss ({float(l2):.6g} vs {float(l1):.6g}). neurothermo expects the mean over "
                "the batch, l_B = (1/b) Σ_i l_i; with a sum every gradient is b times too large "
                "(use reduction='mean' or divide by the batch size)")


def check_scalar_loss(loss: Any) -> Tensor:
    """Check that a loss value is a finite scalar tensor."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.ndim != 0:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return the mean "
            "loss over the batch as a scalar (use reduction='mean')"
        )
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"loss is {loss.item()} (not finite); check parameters, inputs and lr")
    return loss


def check_finite_params(model: nn.Module) -> None:
    """Raise naming the first parameter that holds NaN or Inf."""
    for name, p in model.named_parameters():
        if not all_finite(p):
            raise FloatingPointError(
                f"parameter {name!r} contains NaN or Inf; the model has diverged or was "
                "initialised badly"
            )
