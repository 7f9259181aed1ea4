"""Shared input checks, preprocessing and linear-algebra helpers for the alignment metrics.

Conventions used by every metric: a feature matrix is ``(N, D)`` — N samples (rows, in the same
order for both models) by D features. Rows are never mixed by a preprocessing step except through
the metric itself; ``normalize`` L2-normalises rows (platonic-rep's cosine geometry), and
``clip_quantile`` clamps entries to the mean over rows of the per-row ``q``-quantile of ``|x|``
(platonic-rep's outlier clipping, there applied to all layers of a model at once; here per layer).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from neurothermo._validate import check_int


class AlignmentWarning(UserWarning):
    """A metric was computed, but with a documented fallback (e.g. regularised CCA for N < D)."""


def as_features(x: Any, name: str = "A") -> Tensor:
    """Check that ``x`` is a finite 2-D ``(N, D)`` feature matrix; return it as a float tensor.

    Half-precision inputs are promoted to float32; integer inputs to the default float dtype.
    """
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name} must be a tensor (or array) of shape (N, D), got {type(x).__name__}"
            ) from None
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (N, D) feature matrix, got shape {tuple(x.shape)}; pool or "
            "flatten the other axes first (capture_features(..., pool='mean' | 'flatten') or "
            "x.flatten(1))"
        )
    if x.is_complex():
        raise TypeError(f"{name} is complex; the metrics need real features")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    elif x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); it needs N >= 1 rows and D >= 1 columns")
    # one reduction: any NaN/Inf makes the sum non-finite (an overflowing sum is re-checked exactly)
    if not bool(torch.isfinite(x.sum())) and not bool((finite := torch.isfinite(x)).all()):
        bad_rows = int((~finite).any(dim=1).sum())
        raise ValueError(
            f"{name} contains NaN or Inf ({int((~finite).sum())} entries in {bad_rows} of "
            f"{x.shape[0]} samples); the layer diverged or was captured wrongly. Drop those samples "
            "from both models or fix the layer"
        )
    result: Tensor = x
    return result


def check_pair(a: Tensor, b: Tensor, name_a: str = "A", name_b: str = "B") -> None:
    """Same number of samples and same device, or raise naming both."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} has N={a.shape[0]} samples but {name_b} has N={b.shape[0]}; alignment "
            "compares the representations of the SAME samples, in the same order"
        )
    if a.device != b.device:
        raise ValueError(
            f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device"
        )


def check_k(k: int, n: int, name: str, *, include_self: bool = False) -> int:
    """``k`` neighbours out of ``N − 1`` candidates (``N`` if the sample itself may count)."""
    check_int("k", k, minimum=1)
    limit = n if include_self else n - 1
    if k > limit:
        what = "N" if include_self else "N − 1 (a sample is not its own neighbour)"
        raise ValueError(
            f"k={k} is too large for {name} with N={n} samples: k must be at most {what} = "
            f"{limit}; use a smaller k or more samples"
        )
    return k


def clip_outliers(x: Tensor, q: float = 0.95) -> Tensor:
    """Clamp ``x`` to ``±t`` with ``t`` = mean over rows of the per-row ``q``-quantile of ``|x|``.

    This is platonic-rep's ``remove_outliers`` (non-exact variant), applied to one layer. Clipping
    acts entry-wise, so it breaks the rotation invariance of every metric: leave it off unless you
    reproduce platonic-rep.

    Args:
        x: ``(N, D)`` features.
        q: the quantile in (0, 1] (1: no clipping).

    Returns:
        ``x`` clamped entry-wise to ``[−t, t]`` (same shape and dtype).

    Raises:
        ValueError: ``q`` outside (0, 1].

    Example:
        >>> import torch
        >>> from neurothermo.alignment import clip_outliers
        >>> x = torch.tensor([[1.0, 2.0, 100.0], [1.0, 2.0, 3.0]])
        >>> clip_outliers(x, q=0.5).tolist()  # t = mean of the row medians of |x| = 2
        [[1.0, 2.0, 2.0], [1.0, 2.0, 2.0]]
    """
    if not (0.0 < float(q) <= 1.0):
        raise ValueError(f"clip_quantile must be in (0, 1], got {q!r}")
    if q == 1.0:
        return x
    t = torch.quantile(x.abs().to(torch.float32 if x.dtype != torch.float64 else x.dtype), q, dim=1)
    t = t.mean().to(x.dtype)
    return x.clamp(-t, t)


def preprocess(x: Tensor, *, normalize: bool, clip_quantile: float | None) -> Tensor:
    """Optional outlier clipping, then optional row L2 normalisation (platonic-rep's order).

    A zero row stays zero under ``normalize`` (its similarity to every row is 0, a tie).
    """
    if clip_quantile is not None:
        x = clip_outliers(x, clip_quantile)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    return x


def centre(x: Tensor) -> Tensor:
    """Subtract the column means (float64)."""
    x = x.to(torch.float64)
    return x - x.mean(dim=0, keepdim=True)


def check_not_constant(xc: Tensor, x: Tensor, name: str, what: str) -> None:
    """Raise if the centred features ``xc`` vanish relative to ``x`` (constant features).

    The threshold is 10 units of roundoff of the input dtype: below it the variation across samples
    is not resolved by the input's precision.
    """
    eps = torch.finfo(x.dtype).eps if x.is_floating_point() else torch.finfo(torch.float64).eps
    size = float(torch.linalg.vector_norm(x.to(torch.float64)))
    if float(torch.linalg.vector_norm(xc)) <= 10 * eps * size or size == 0.0:
        raise ValueError(
            f"{name} is constant across samples (no variation left after centring), so {what} is "
            "undefined (0/0); drop this layer or check that its hook captured the right output"
        )


def compress(x: Tensor) -> Tensor:
    """A ``(N, min(N, D))`` matrix with the same Gram matrix ``x xᵀ`` as ``x`` (float64).

    For ``D > N`` a QR factorisation ``xᵀ = Q R`` gives ``x = Rᵀ Qᵀ`` and ``x xᵀ = Rᵀ R``: every
    rotation-invariant metric is unchanged, and feature-space products cost ``O(N²)`` instead of
    ``O(N·D)`` per column.
    """
    x = x.to(torch.float64)
    n, d = x.shape
    if d <= n:
        return x
    r = torch.linalg.qr(x.T, mode="reduced").R  # (N, N)
    result: Tensor = r.T
    return result


def inverse_permutation(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def finite_float(value: Tensor | float, what: str) -> float:
    v = float(value)
    if not math.isfinite(v):  # pragma: no cover - guarded upstream; kept as a last line of defence
        raise FloatingPointError(f"{what} is not finite ({v}); please report this input")
    return v
