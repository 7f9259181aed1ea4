"""Helpers shared by the experiments of the rest of the theory (noise term, scale invariance,
discrete symmetries, matrix learning rates, momentum): data subsets, flat vectors, two small test
problems, a preconditioned top eigenvalue and a multiple-comparison threshold. Pure functions; nothing here writes files.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Objective = Callable[[dict[str, Tensor]], Tensor]


def digits_subset(n: int, seed: int, *, dtype: torch.dtype = torch.float64,
                  flatten: bool = True) -> tuple[Tensor, Tensor]:
    """``n`` of scikit-learn's 1,797 digits drawn without replacement with ``seed`` (pixels in [0, 1])."""
    from neurothermo.data import load_digits

    x, y = load_digits(dtype, flatten=flatten)
    if not 2 <= n <= len(y):
        raise ValueError(f"n_data must be in [2, {len(y)}], got {n}")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


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


def distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Euclidean distance between two parameter dicts with the same keys."""
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def problem(name: str, seed: int) -> tuple[nn.Module, Objective]:
    """The model (its parameters are the start) and ``L`` as a function of a parameter dict."""
    gen = torch.Generator().manual_seed(seed)
    if name == "smooth":
        A = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        c = torch.randn(8, generator=gen, dtype=torch.float64)
        holder = nn.Module()
        holder.theta = nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))

        def smooth(p: dict[str, Tensor]) -> Tensor:
            t = p["theta"]
            return 0.5 * ((A @ t - c) ** 2).sum() + 0.25 * (t**4).sum()

        return holder, smooth
    x, y = digits_subset(64, seed)
    torch.manual_seed(seed)
    from neurothermo.models import mlp

    model = mlp([64, 16, 10], "tanh").double()
    net = model

    def loss(p: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    return model, loss


def top_eigenvalue(f: Objective, theta: dict[str, Tensor], lam: dict[str, Tensor],
                   iters: int = 100) -> float:
    """Largest |eigenvalue| of ``Λ^½ H Λ^½`` by power iteration (Hessian-vector products)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    g = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
    root = [lam[k].sqrt().expand_as(v) for k, v in leaves.items()]
    v = [torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=t.dtype) for t in root]
    est = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((vi**2).sum()) for vi in v))
        v = [vi / norm for vi in v]
        hv = torch.autograd.grad(g, list(leaves.values()), [r * vi for r, vi in zip(root, v)],
                                 retain_graph=True)
        v = [r * h for r, h in zip(root, hv)]
        est = math.sqrt(sum(float((vi**2).sum()) for vi in v))
    return est
