"""Stochastic trace estimators with standard errors: Hutchinson and Hutch++.

Hutchinson (1989): with Rademacher probes ``z`` (entries ±1, ``E zzᵀ = I``),
``E[zᵀ H z] = tr H``; ``Var[zᵀ H z] = 2 (‖H‖_F² − Σ_i H_ii²)``. With ``m`` probes the estimate is the
mean of ``q_j = z_jᵀ H z_j`` and its standard error ``std(q)/√m`` (sample std, ``ddof = 1``).

Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends ``m`` products as: ``s = ⌊m/3⌋`` on a sketch
``H S`` whose orthonormal basis ``Q`` captures the top of the spectrum, ``s`` on ``tr(Qᵀ H Q)``
(exact), and the remaining ``g = m − 2s`` on Hutchinson for the deflated part ``(I−QQᵀ)H(I−QQᵀ)``:

    t = tr(Qᵀ H Q) + (1/g) Σ_j (P z_j)ᵀ H (P z_j),     P = I − Q Qᵀ.

Given ``Q`` the second term is an unbiased Hutchinson estimate of ``tr(P H P) = tr H − tr(QᵀHQ)``,
so ``t`` is unbiased and its standard error (conditional on ``Q``, which is exact because the first
term has no further randomness) is ``std(q)/√g``. Variance falls like ``1/m²`` instead of ``1/m`` when
the spectrum decays fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, get_args

import torch
from torch import Tensor, nn

from neurothermo._state import ParamFilter, warn_mode
from neurothermo._types import HvpMethod, LossFn, Mode, TraceMethod
from neurothermo._validate import check_int
from neurothermo.curvature.hvp import hessian_operator
from neurothermo.curvature.operator import LinearOperator

TRACE_METHODS: tuple[str, ...] = get_args(TraceMethod)


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate with its standard error.

    Attributes:
        estimate: the estimate of ``tr H``.
        stderr: its standard error (see the module docstring; 0 when the sketch spans everything).
        n_hvp: Hessian-vector products used.
        method: "hutchinson" or "hutch++".
        samples: the Hutchinson quadratic forms ``q_j`` (float64, CPU).
    """

    estimate: float
    stderr: float
    n_hvp: int
    method: str
    samples: Tensor


def rademacher(n: int, m: int, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator | None) -> Tensor:
    """``(n, m)`` matrix of independent ±1 entries (drawn on the CPU for reproducibility)."""
    bits = torch.randint(0, 2, (n, m), generator=generator, dtype=torch.int8)
    return (2 * bits - 1).to(device=device, dtype=dtype)


def _quadratic_forms(op: LinearOperator, Z: Tensor, chunk: int = 16) -> Tensor:
    out = []
    for j in range(0, Z.shape[1], chunk):
        Zj = Z[:, j:j + chunk]
        out.append((Zj * op.matmat(Zj)).sum(dim=0).double().cpu())
    q = torch.cat(out)
    if not bool(torch.isfinite(q).all()):
        raise FloatingPointError("a Hessian-vector product contains NaN or Inf; the loss is not twice "
                                 "differentiable at these parameters (or overflows)")
    return q


def _stderr(q: Tensor) -> float:
    return float(q.std(unbiased=True)) / math.sqrt(q.numel()) if q.numel() > 1 else 0.0


def hutchinson(op: LinearOperator, n_samples: int, *,
               generator: torch.Generator | None = None) -> TraceResult:
    """Hutchinson's estimate of ``tr op`` from ``n_samples`` (≥ 2) Rademacher probes.

    ``t = (1/m) Σ_j z_jᵀ op z_j``, standard error ``std(q)/√m`` (``ddof = 1``).

    Args:
        op: a symmetric :class:`LinearOperator`.
        n_samples: the number of probes m (≥ 2), one product each.
        generator: the random source of the probes (drawn on the CPU); None: torch's global one.

    Returns:
        A :class:`TraceResult` (``method="hutchinson"``).

    Raises:
        TypeError: a non-int ``n_samples``.
        ValueError: ``n_samples`` < 2.
        FloatingPointError: a product contains NaN or Inf.

    Example:
        >>> import torch
        >>> from neurothermo.curvature import DenseOperator, hutchinson
        >>> op = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = hutchinson(op, 20, generator=torch.Generator().manual_seed(0))
        >>> res.estimate, res.stderr  # diagonal: Var = 2(‖H‖_F² − Σ H_ii²) = 0, every probe exact
        (55.0, 0.0)
    """
    check_int("n_samples", n_samples, minimum=2)
    used = op.n_matvec
    q = torch.cat([_quadratic_forms(op, rademacher(op.size, min(64, n_samples - j), op.dtype,
                                                   op.device, generator))
                   for j in range(0, n_samples, 64)])
    return TraceResult(float(q.mean()), _stderr(q), op.n_matvec - used, "hutchinson", q)


def hutchpp(op: LinearOperator, n_samples: int, *,
            generator: torch.Generator | None = None) -> TraceResult:
    """Hutch++ estimate of ``tr op`` from ``n_samples`` (≥ 4) products (module docstring).

    Args:
        op: a symmetric :class:`LinearOperator`.
        n_samples: the budget of products (≥ 4): a third for the sketch, a third for its trace,
            the rest for Hutchinson on the deflated part.
        generator: the random source of the probes (drawn on the CPU); None: torch's global one.

    Returns:
        A :class:`TraceResult` (``method="hutch++"``; ``stderr`` is 0 when the sketch spans the
        whole space).

    Raises:
        TypeError: a non-int ``n_samples``.
        ValueError: ``n_samples`` < 4.
        FloatingPointError: a product contains NaN or Inf.

    Example:
        >>> import torch
        >>> from neurothermo.curvature import DenseOperator, hutchpp
        >>> op = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = hutchpp(op, 30, generator=torch.Generator().manual_seed(0))
        >>> abs(res.estimate - 55.0) < 1e-9  # the sketch spans all 10 directions
        True
    """
    check_int("n_samples", n_samples, minimum=4)
    used = op.n_matvec
    s = n_samples // 3
    g = n_samples - 2 * s
    S = rademacher(op.size, s, op.dtype, op.device, generator)
    Q, _ = torch.linalg.qr(op.matmat(S))
    Q = Q[:, : min(s, op.size)]
    low_rank = float((Q * op.matmat(Q)).sum().double())
    G = rademacher(op.size, g, op.dtype, op.device, generator)
    G = G - Q @ (Q.T @ G)
    q = _quadratic_forms(op, G)
    if not math.isfinite(low_rank):
        raise FloatingPointError("a Hessian-vector product contains NaN or Inf")
    return TraceResult(low_rank + float(q.mean()), _stderr(q), op.n_matvec - used, "hutch++", q)


def hessian_trace(model: nn.Module, loss_fn: LossFn, data: Any, *, n_samples: int,
                  method: TraceMethod = "hutchinson", param_filter: ParamFilter = None, mode: Mode = None,
                  hvp_method: HvpMethod = "reverse", microbatch_size: int | None = None,
                  seed: int = 0) -> TraceResult:
    """Estimate ``tr H`` of the mean loss over ``data`` (same ``H`` as ``hvp``) with its standard error.

    ``n_samples`` is the budget of Hessian-vector products (Hutchinson: probes, ≥ 2; Hutch++: split
    in thirds, ≥ 4). Per-layer traces: ``param_filter``. Hutchinson's estimate is the mean of
    ``q_j = z_jᵀ H z_j`` over Rademacher probes, its standard error ``std(q)/√m``.

    Args:
        model: the network; θ are its trainable parameters selected by ``param_filter``. Left
            unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: one batch ``(inputs, targets)`` or an iterable of batches (the data model,
            ``docs/data.md``); ``H`` is of the mean loss over all N of their samples.
        n_samples: the number of Hessian-vector products.
        method: ``"hutchinson"`` or ``"hutch++"``.
        hvp_method: how each product is computed: ``"reverse"`` (double backward),
            ``"forward_over_reverse"`` or ``"finite_difference"``.
        microbatch_size: at most this many samples per pass (≥ 1; microbatches weighted
            ``b_m/N``); None: the batches as given.
        param_filter: which parameters θ spans: None (all trainable), a name prefix, a list of
            names / prefixes, or a predicate ``(name, tensor) -> bool``.
        mode: None (the model's current train/eval flags), ``"train"`` or ``"eval"``.
        seed: seed of the random probes.

    Returns:
        A :class:`TraceResult`: ``estimate`` of ``tr H``, ``stderr``, ``n_hvp`` and the ``samples``.

    Raises:
        TypeError: ``loss_fn`` not callable, non-number or non-int arguments, data of the
            wrong type.
        ValueError: an unknown ``method``, ``n_samples`` below its minimum, a loss that is not a
            scalar (e.g. ``reduction="none"``) or not mean-reduced, an unknown ``hvp_method`` or
            ``mode``, a ``param_filter`` matching nothing, ``microbatch_size`` splitting batches of
            train-mode BatchNorm, data with NaN/Inf.
        FloatingPointError: non-finite parameters or Hessian-vector products.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> tr = nt.hessian_trace(model, loss_fn, (x, y), n_samples=20)
        >>> tr.n_hvp, tr.method
        (20, 'hutchinson')
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    check_int("n_samples", n_samples, minimum=2 if method == "hutchinson" else 4)
    gen = torch.Generator()
    gen.manual_seed(seed)
    warn_mode(model, mode, "hessian_trace", fixed_masks=True)
    with hessian_operator(model, loss_fn, data, mode=mode, method=hvp_method,
                          microbatch_size=microbatch_size, param_filter=param_filter,
                          seed=seed, warn=False) as op:
        est = hutchinson if method == "hutchinson" else hutchpp
        return est(op, n_samples, generator=gen)
