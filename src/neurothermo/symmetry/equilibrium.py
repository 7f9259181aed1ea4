"""Stationary charge of a symmetry under SGD with weight decay (docs/theory.md §2).

Taking expectations of the exact step ``J' = (1 − lr·wd)²·J + lr²·gᵀAg`` at stationarity gives::

    E[J] = lr·E[gᵀAg] / (wd·(2 − lr·wd))          (wd > 0, lr·wd < 2)
    E[gᵀAg] = 0                                     (wd = 0: gradient balance)

For a scale symmetry (``A`` positive definite, ``gᵀAg = ‖g‖² > 0``) there is no balance point:
with ``wd = 0`` the norm grows forever; with ``wd > 0``, ``E‖w‖² = lr·E‖g‖²/(wd·(2 − lr·wd))``.
``weight_decay`` is torch's (penalty ``(wd/2)‖θ‖²``, the paper's ``γ = wd/2``) and must act on every
parameter of the orbit.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo._validate import check_positive
from neurothermo.symmetry.base import Symmetry

GradStats = Tensor | Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]] | Sequence[Tensor]


@dataclass(frozen=True)
class ChargeEquilibrium:
    """Predicted stationary charge, with the standard errors propagated from ``grad_stats``.

    Returned by :func:`charge_equilibrium`.

    Attributes:
        kind: the symmetry's kind.
        lr: η.
        weight_decay: torch's ``wd``.
        samples: how many samples of ``gᵀAg`` were given.
        mean_imbalance: the estimate of ``E[gᵀAg]`` (shape of the charge).
        imbalance_stderr: its standard error, ``std/√samples`` treating samples as independent
            (``None`` with fewer than two samples; samples taken along one trajectory are
            correlated: pass batch means instead).
        charge: predicted ``E[J] = lr·E[gᵀAg]/(wd·(2 − lr·wd))`` (``None`` when ``weight_decay =
            0``: the prediction is then balance, ``E[gᵀAg] = 0``).
        charge_stderr: its standard error (None where ``charge`` or ``imbalance_stderr`` is).
        note: the prediction in words.
    """

    kind: str
    lr: float
    weight_decay: float
    samples: int
    mean_imbalance: Tensor
    imbalance_stderr: Tensor | None
    charge: Tensor | None
    charge_stderr: Tensor | None
    note: str


def _samples(symmetry: Symmetry, grad_stats: GradStats) -> Tensor:
    shape = symmetry.charge_shape
    if isinstance(grad_stats, Tensor):
        s = grad_stats
    elif isinstance(grad_stats, Mapping):
        s = symmetry.imbalance(grad_stats).unsqueeze(0)
    elif isinstance(grad_stats, Sequence) and len(grad_stats) > 0:
        items = [symmetry.imbalance(g) if isinstance(g, Mapping) else g for g in grad_stats]
        if not all(isinstance(x, Tensor) for x in items):
            raise TypeError("grad_stats items must be gradient mappings or imbalance tensors")
        s = torch.stack(items)
    else:
        raise TypeError(
            "grad_stats must be an imbalance tensor (shape of the charge, or samples stacked on "
            "dim 0), a gradient mapping {name: grad}, or a non-empty sequence of either; got "
            f"{type(grad_stats).__name__}"
        )
    if tuple(s.shape) == shape:
        s = s.unsqueeze(0)
    if tuple(s.shape[1:]) != shape:
        raise ValueError(
            f"grad_stats has shape {tuple(s.shape)}; expected {shape} (one value of gᵀAg) or "
            f"(samples, *{shape})"
        )
    if s.shape[0] == 0:
        raise ValueError("grad_stats holds no samples")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("grad_stats contains NaN or Inf")
    return s


def charge_equilibrium(
    symmetry: Symmetry, grad_stats: GradStats, lr: float, weight_decay: float = 0.0
) -> ChargeEquilibrium:
    """``E[J] = lr·E[gᵀAg]/(wd·(2 − lr·wd))`` from samples of ``gᵀAg`` (balance when wd = 0).

    ``grad_stats``: samples of the imbalance ``symmetry.imbalance(grads)`` stacked on dim 0 (or one
    value), or gradient mappings ``{name: g_B}`` (minibatch gradients without the weight-decay term).
    ``g_B`` is the gradient of a minibatch's mean-reduced loss; ``weight_decay`` is torch's ``wd``
    (penalty ``(wd/2)‖θ‖²``, the paper's ``γ = wd/2``), so ``wd·(2 − lr·wd)`` is ``1 − (1 − lr·wd)²``,
    the per-step decay of ``J`` under SGD.

    Args:
        symmetry: a non-isometric :class:`Symmetry` (rescale, scale or double rotation).
        grad_stats: an imbalance tensor (the charge's shape, or samples stacked on dim 0), a
            gradient mapping ``{name: g_B}``, or a non-empty sequence of either.
        lr: the learning rate η (> 0).
        weight_decay: torch's ``wd`` (≥ 0, with ``lr·wd < 2``).

    Returns:
        A :class:`ChargeEquilibrium`: the mean imbalance with its standard error and the
        predicted charge ``E[J]`` with its (None when ``wd = 0``: the prediction is balance).

    Raises:
        TypeError: ``symmetry`` not a :class:`Symmetry`, ``grad_stats`` of another type, or
            non-number ``lr`` / ``weight_decay``.
        ValueError: an isometry (permutation, sign flip: no charge), ``lr`` ≤ 0,
            ``weight_decay`` < 0, ``lr·wd`` ≥ 2 (no stationary charge), ``grad_stats`` of the
            wrong shape, empty, or with NaN/Inf.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()
        >>> sym = next(s for s in nt.find_symmetries(model, x[:4]) if s.kind == "rescale")
        >>> names = [n for n, _ in model.named_parameters()]
        >>> samples = []
        >>> for i in range(4):  # gᵀAg of four minibatch gradients
        ...     g = torch.autograd.grad(loss_fn(model(x[8 * i:8 * i + 8]), y[8 * i:8 * i + 8]),
        ...                             list(model.parameters()))
        ...     samples.append(sym.imbalance(dict(zip(names, g))))
        >>> eq = nt.charge_equilibrium(sym, torch.stack(samples), lr=0.1, weight_decay=1e-3)
        >>> eq.samples, eq.charge.shape
        (4, torch.Size([8]))
        >>> torch.allclose(eq.charge, 0.1 / (1e-3 * (2 - 0.1 * 1e-3)) * eq.mean_imbalance)
        True
    """
    if not isinstance(symmetry, Symmetry):
        raise TypeError(f"symmetry must be a Symmetry, got {type(symmetry).__name__}")
    if symmetry.isometry:
        raise ValueError(
            f"{symmetry.kind} is an isometry: no charge, no equilibrium (SGD never breaks it)"
        )
    lr = check_positive("lr", lr)
    wd = check_positive("weight_decay", weight_decay, allow_zero=True)
    if lr * wd >= 2:
        raise ValueError(
            f"lr·weight_decay = {lr * wd:g} >= 2: the decay factor |1 − lr·wd| ≥ 1, SGD has no "
            "stationary charge (lower lr or weight_decay)"
        )
    s = _samples(symmetry, grad_stats)
    k = s.shape[0]
    mean = s.mean(0)
    err = s.std(0, correction=1) / math.sqrt(k) if k > 1 else None
    if wd == 0:
        note = ("wd = 0: the prediction is gradient balance, E[gᵀAg] = 0" if symmetry.kind != "scale"
                else "wd = 0: a scale symmetry has no equilibrium; ‖w‖² grows by lr²·E‖g‖² per step")
        return ChargeEquilibrium(symmetry.kind, lr, wd, k, mean, err, None, None, note)
    factor = lr / (wd * (2.0 - lr * wd))
    return ChargeEquilibrium(
        symmetry.kind, lr, wd, k, mean, err, factor * mean,
        None if err is None else factor * err,
        "E[J] = lr·E[gᵀAg]/(wd·(2 − lr·wd))",
    )
