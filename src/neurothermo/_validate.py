"""Input checks shared by every public function.

Each check raises an error that names the offending value and says how to fix it: bad input must
never turn into a NaN or a silently wrong number further down.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``value`` as float, or raise if it is not a finite positive number."""
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
    with torch.no_grad():
        if bool(torch.isfinite(t.sum())):
            return True
        return bool(torch.isfinite(t).all())


def check_loss_fn(loss_fn: Callable[..., Tensor] | None) -> None:
    """Reject loss functions that declare a non-mean reduction.

    neurothermo's convention (THEORY.md): ``loss_fn(outputs, targets)`` returns the *mean* of the
    per-sample losses over the batch, ``l_B = (1/b) Σ_i l_i``. A sum-reduced loss would scale
    every gradient by b and every entropic term by b², silently.
    """
    if loss_fn is None:  # the model returns its own loss (neurothermo._data.model_loss)
        return
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is not None and reduction != "mean":
        raise ValueError(
            f"loss_fn has reduction={reduction!r}; neurothermo expects a mean-reduced loss "
            "l_B = (1/b) Σ_i l_i (e.g. nn.CrossEntropyLoss() or nn.MSELoss() with the default "
            "reduction='mean'). With 'sum' every gradient is b times too large."
        )


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
