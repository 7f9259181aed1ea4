"""Power iteration with deflation (PyHessian's method), kept as the simple alternative to Lanczos.

Eigenpair ``i`` is found by iterating ``v ← P H P v / ‖·‖`` with ``P = I − Y Yᵀ`` projecting out the
pairs already found (deflation by projection). Power iteration converges to the eigenvalue of
largest *magnitude*; when that one is negative (the iteration converged to ``θ < 0``), it is rerun on
``P H P − θ I``, whose spectrum is shifted to ``≥ 0``, so the result is the algebraically largest
eigenvalue, as for Lanczos. Stopping rule: the residual ``r = ‖H v − θ v‖ ≤ tol · |θ|`` (no gap
estimate is available here, so the error estimate is ``r`` itself, a rigorous bound on the distance
from ``θ`` to the spectrum). Convergence is linear with ratio ``|λ_{i+1}/λ_i|``: many more products
than Lanczos on clustered spectra (see ``benchmarks/bench_curvature.py``).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from neurothermo.curvature.gram_schmidt import random_block
from neurothermo.curvature.lanczos import (
    ConvergenceWarning,
    RitzResult,
    _check_common,
    converged_mask,
)
from neurothermo.curvature.operator import LinearOperator


def _project_out(v: Tensor, Y: Tensor) -> Tensor:
    if Y.shape[1]:
        v = v - Y @ (Y.T @ v)
    return v


def power_iteration(op: LinearOperator, k: int = 1, *, tol: float = 1e-3,
                    max_matvec: int | None = None,
                    generator: torch.Generator | None = None) -> RitzResult:
    """The ``k`` algebraically largest eigenpairs of ``op`` by deflated (shifted) power iteration.

    Args:
        op: a symmetric :class:`LinearOperator` of size n.
        k: how many of the largest eigenvalues (1 ≤ k < n).
        tol: relative accuracy of each eigenvalue (> 0): stop when every error estimate is
            ``≤ tol·|λ|``.
        max_matvec: the cap on products (≥ k); None: ``200 + 50k``.
        generator: the random source of the start vectors (drawn on the CPU).

    Returns:
        A :class:`RitzResult`, largest first, with residuals and error estimates.

    Raises:
        TypeError: non-int ``k``/``max_matvec`` or a non-number ``tol``.
        ValueError: ``k`` < 1 or ≥ n, ``tol`` ≤ 0, ``max_matvec`` < k.
        FloatingPointError: a product contains NaN or Inf.

    Warns:
        ConvergenceWarning: the budget ran out before ``tol`` was met (the estimate is returned).

    Example:
        >>> import torch
        >>> from neurothermo.curvature import DenseOperator, power_iteration
        >>> op = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = power_iteration(op, k=2, tol=1e-8)
        >>> [round(v, 6) for v in res.values.tolist()], res.converged
        ([10.0, 9.0], True)
    """
    n = op.size
    budget = _check_common(op, k, tol, max_matvec)
    dt, dev = op.dtype, op.device
    Y = torch.zeros(n, 0, dtype=dt, device=dev)
    values: list[float] = []
    resids: list[float] = []
    used = op.n_matvec
    all_converged = True
    for _ in range(k):
        shift = 0.0
        v = _project_out(random_block(n, 1, dt, dev, generator)[:, 0], Y)
        v = v / torch.linalg.vector_norm(v)
        theta, r, ok = 0.0, float("inf"), False
        while op.n_matvec - used < budget:
            w = _project_out(op.matvec(v), Y)
            theta = float(v @ w)
            r = float(torch.linalg.vector_norm(w - theta * v))
            if not (abs(theta) < float("inf") and r < float("inf")):
                raise FloatingPointError(
                    "a Hessian-vector product contains NaN or Inf; the loss is not twice "
                    "differentiable at these parameters (or overflows)")
            scale_ref = torch.tensor([theta, *values], dtype=torch.float64)
            if bool(converged_mask(torch.tensor([theta]), torch.tensor([r]), tol, scale_ref, dt)[0]):
                if theta < 0 and shift == 0.0:  # dominant magnitude is negative: shift and rerun
                    shift = theta
                    v = _project_out(random_block(n, 1, dt, dev, generator)[:, 0], Y)
                    v = v / torch.linalg.vector_norm(v)
                    continue
                ok = True
                break
            v = _project_out(w - shift * v, Y)
            v = v / torch.linalg.vector_norm(v)
        all_converged &= ok
        Y = torch.cat([Y, v[:, None]], dim=1)
        values.append(theta)
        resids.append(r)
        if not ok:
            break
    vals = torch.tensor(values, dtype=torch.float64)
    order = torch.argsort(vals, descending=True)
    res = torch.tensor(resids, dtype=torch.float64)[order]
    if not all_converged or len(values) < k:
        warnings.warn(
            f"power iteration stopped after {op.n_matvec - used} Hessian-vector products "
            f"(max_hvp={budget}) with {len(values)} of {k} eigenvalues, residuals {res.tolist()}, "
            f"before reaching tol={tol}; raise max_hvp or tol, or use method='lanczos'",
            ConvergenceWarning, stacklevel=2)
    return RitzResult(vals[order], Y[:, order], res, res.clone(), op.n_matvec - used,
                      all_converged and len(values) == k)
