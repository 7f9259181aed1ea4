"""Helpers shared by the experiments of the rest of the theory (noise term, scale invariance,
discrete symmetries, matrix learning rates): data subsets, flat gradients and a multiple-comparison
threshold. Pure functions; nothing here writes files.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import torch
from torch import Tensor, nn


def digits_subset(n: int, seed: int, *, dtype: torch.dtype = torch.float64,
                  flatten: bool = True) -> tuple[Tensor, Tensor]:
    """``n`` of scikit-learn's 1,797 digits drawn without replacement with ``seed`` (pixels in [0, 1])."""
    from neurothermo.data import load_digits

    x, y = load_digits(dtype, flatten=flatten)
    if not 2 <= n <= len(y):
        raise ValueError(f"n_data must be in [2, {len(y)}], got {n}")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def flat_grad(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor,
              y: Tensor) -> Tensor:
    """``∇l_B`` of the mean-reduced ``loss_fn(model(x), y)`` as one flat vector (no ``.grad`` touched)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss_fn(model(x), y), params)
    return torch.cat([gi.reshape(-1) for gi in g])


def flat_params(model: nn.Module) -> Tensor:
    """All trainable parameters of ``model`` as one detached flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def bonferroni_z(m: int, alpha: float = 1e-3) -> float:
    """Two-sided normal critical value for ``m`` comparisons at family-wise level ``alpha``.

    ``max |z| ≤ bonferroni_z(m)`` fails with probability at most ``alpha`` when every z is a
    standard normal (Monte-Carlo means of many draws are, by the central limit theorem).
    """
    if m < 1:
        raise ValueError(f"need at least one comparison, got m={m}")
    return float(NormalDist().inv_cdf(1 - alpha / (2 * m)))


def rel(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (``‖a − b‖`` when ``b`` is zero)."""
    den = float(b.norm())
    num = float((a - b).norm())
    return num / den if den > 0 else num if math.isfinite(num) else float("nan")
