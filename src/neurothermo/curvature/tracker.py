"""``SharpnessTracker``: λ_max during training, warm-started from the previous eigenvectors.

The first update (and any after ``reset()`` or a change of the parameter set) runs block Lanczos from
random vectors (``lanczos.py``). Every later update runs ``warm_davidson``: Rayleigh–Ritz on a basis
that starts as the top ``k + 2`` Ritz vectors of the previous update (``k`` wanted plus two guards;
``k + 2`` products) and grows by one product per step, always in the direction of the residual
``H y − θ y`` of the wanted Ritz pair furthest from convergence (Davidson without preconditioner;
for one wanted pair this is the Krylov space of the current best vector, which the band Lanczos of a
``k + 1`` start block reaches only at two products per step). The guards matter when the top
eigenvalues are close or cross: on the digits MLP below λ2/λ1 reached 0.995, and the new top
eigenvector had overlap 0.47 with the *third* old Ritz vector; started from the old top vector alone,
any Krylov method can certify the eigenvalue that vector now belongs to before it has seen the new top
(``tests/test_curvature_tracker.py`` builds exact crossings where that happens).

Stopping rule: the cluster Kato–Temple estimate ``‖R_C‖²/δ_C`` of ``ritz_errors``, trusted from the
first step (the start block already approximates the top eigenvectors) but with every Ritz gap
counted at half its size (``WARM_GAP_SCALE``). The halving is a margin, not a proof: a Ritz value
lags its eigenvalue (``θ_j ≤ λ_j``) while its vector is unconverged, and the guards are never
converged (their residuals stay at 10–20% of λ_max), so Ritz gaps overestimate the true gaps; measured
at the stopping point over 185 warm updates of five trajectories (ReLU MLP lr 0.1, ReLU MLP lr 0.05,
MLP with momentum 0.9, tanh MLP, small CNN, all on digits) the true gap ``λ1 − λ2`` was 0.2–1× the
Ritz gap (median 0.8). A rigorous certificate would need an *upper* bound on λ2, which Krylov data
cannot give (with ``λ2 ≤ θ2 + r2`` the rule reduces to ``r1 ≤ tol·θ1`` and costs 11 products at
worst); no rule sees an eigenvalue whose eigenvector is orthogonal to everything multiplied so far.

Measured (``benchmarks/bench_curvature.py --tracker-only``: ReLU MLP 64-64-10 on 1,000 digits, SGD
lr 0.1, update every 3 steps, k = 1, tol = 1e-3; the 17 updates where λ_max moved < 5%): median 6
products, 100% ≤ 10, max 10 (the previous block-Lanczos warm start: median 9, 76% ≤ 10, max 17; a
cold start: median 13); over all 40 updates the error against a tol-1e-8 solve stayed ≤ 0.23·tol.
On the four other trajectories: ≤ 9 products per such update and errors ≤ 0.4·tol. The cost is set
by the tolerance and by how close the top eigenvalues are.

Stability (docs/theory.md §4, Cohen et al. 2021): gradient descent with learning rate η is stable on a
quadratic while ``η·λ_max < 2``; heavy-ball momentum β moves the limit to ``2(1 + β)``
(``torch.optim.SGD(momentum=β, dampening=0)``). Each reading reports ``η·λ_max`` against that limit.
For adaptive methods pass ``preconditioner`` (``Λ`` of the step ``−η Λ g``): the reading is then the
top eigenvalue of ``Λ^{1/2} H Λ^{1/2}`` (for Adam, whose limit also depends on β₁, the ratio is
only indicative).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._state import ParamFilter, check_mode, warn_mode
from neurothermo._types import EigenMethod, HvpMethod, LossFn, Mode
from neurothermo._validate import check_int, check_positive
from neurothermo.curvature.eigen import EIGEN_METHODS, preconditioner_diagonal, solve
from neurothermo.curvature.gram_schmidt import orthonormalize, random_block
from neurothermo.curvature.hvp import HVP_METHODS, hessian_operator
from neurothermo.curvature.lanczos import (
    ConvergenceWarning,
    RitzResult,
    _check_common,
    converged_mask,
    ritz_errors,
)
from neurothermo.curvature.operator import CongruenceOperator, LinearOperator, column_block

COLD_GAP_AFTER = 20  # cold starts trust Ritz gaps from 20 basis vectors (lanczos.py)
WARM_GAP_SCALE = 0.5  # warm starts trust half of each Ritz gap from the first product on (docstring)


def _finite(h: Tensor) -> None:
    if not bool(torch.isfinite(h).all()):
        raise FloatingPointError(
            "a Hessian-vector product contains NaN or Inf; the loss is not twice "
            "differentiable at these parameters (or overflows)")


def warm_davidson(op: LinearOperator, k: int, start: Tensor, *, tol: float = 1e-3,
                  max_matvec: int | None = None, max_basis: int | None = None,
                  gap_scale: float = WARM_GAP_SCALE,
                  generator: torch.Generator | None = None) -> RitzResult:
    """The ``k`` largest eigenpairs of ``op`` by Rayleigh–Ritz on a growing basis started from ``start``.

    ``start`` ``(n, s)``: the previous top Ritz vectors (``s ≥ k``; ``s = k + 2`` in the tracker).
    The basis ``V`` begins as ``orth(start)`` (``s`` products); every later step costs one product:
    the residual ``H y_j − θ_j y_j`` of the wanted Ritz pair furthest from convergence is
    orthogonalised against ``V`` (twice) and appended (Davidson without preconditioner). ``W = H V``
    is stored, so the Ritz pairs ``(θ_i, y_i = V s_i)`` of ``Vᵀ W`` and their residuals
    ``r_i = ‖W s_i − θ_i V s_i‖`` need no further products. Errors: ``ritz_errors`` (cluster
    Kato–Temple ``‖R_C‖²/δ_C``) with each Ritz gap counted as ``gap_scale·δ_C``, trusted from the first
    step (the start block already holds approximations of the top ``s`` eigenvectors). Thick restart
    on the top half of the Ritz vectors when the basis reaches ``max_basis`` (default
    ``max(30, 3s)``). Running out of ``max_matvec`` returns the estimate and warns.
    """
    n = op.size
    budget = _check_common(op, k, tol, max_matvec)
    if start.ndim != 2 or start.shape[0] != n or start.shape[1] < 1:
        raise ValueError(f"start must have shape ({n}, s) with s >= 1, got {tuple(start.shape)}")
    if not 0 < gap_scale <= 1:
        raise ValueError(f"gap_scale must be in (0, 1], got {gap_scale}")
    dt, dev = op.dtype, op.device
    s = min(max(start.shape[1], k), n)
    m_max = min(n, max(30, 3 * s) if max_basis is None else check_int("max_basis", max_basis, minimum=s + 1))
    Q0 = random_block(n, s, dt, dev, generator)
    Q0[:, :start.shape[1]] = start[:, :s].to(device=dev, dtype=dt)
    V = column_block(n, m_max, dt, dev)
    W = column_block(n, m_max, dt, dev)
    V[:, :s], _ = orthonormalize(Q0, V[:, :0], 1e-12 * float(Q0.abs().max()), generator)
    used = op.n_matvec
    W[:, :s] = op.matmat(V[:, :s])
    _finite(W[:, :s])
    m = s
    while True:
        T = (V[:, :m].T @ W[:, :m]).double().cpu()
        theta, S = torch.linalg.eigh((T + T.T) / 2)
        theta, S = theta.flip(0), S.flip(1)
        Sd = S.to(device=dev, dtype=dt)
        Y, HY = V[:, :m] @ Sd, W[:, :m] @ Sd
        R = HY - Y * theta.to(device=dev, dtype=dt)
        resid = torch.linalg.vector_norm(R, dim=0).double().cpu()
        errors = ritz_errors(theta, resid, 2, count=k, gap_scale=gap_scale)
        ok = converged_mask(theta[:k], errors[:k], tol, theta, dt)
        done = bool(ok.all()) or m == n
        if done or op.n_matvec - used + 1 > budget:
            break
        # expand by the residual of the wanted pair furthest from its target
        ratio = errors[:k] / (tol * theta[:k].abs()).clamp(min=torch.finfo(torch.float64).tiny)
        j = int(torch.argmax(torch.where(ok, torch.zeros_like(ratio), ratio)))
        if m == m_max:  # thick restart: keep the top Ritz vectors, H V stays consistent
            ell = max(s, m_max // 2)
            V[:, :ell], W[:, :ell] = Y[:, :ell], HY[:, :ell]
            m = ell
        w = R[:, j:j + 1].clone()
        for _ in range(2):
            w.addmm_(V[:, :m], V[:, :m].T @ w, alpha=-1)
        tiny = 100 * torch.finfo(dt).eps * max(float(theta.abs().max()), 1e-300)
        q, _ = orthonormalize(w, V[:, :m], tiny, generator)
        V[:, m] = q[:, 0]
        W[:, m] = op.matmat(q)[:, 0]
        _finite(W[:, m])
        m += 1
    kk = min(k, m)
    if not done:
        warnings.warn(
            f"warm-started eigensolver stopped after {op.n_matvec - used} Hessian-vector products "
            f"(max_hvp={budget}) before reaching tol={tol}: error estimates {errors[:kk].tolist()} "
            f"for eigenvalues {theta[:kk].tolist()}; raise max_hvp or tol",
            ConvergenceWarning, stacklevel=3)
    return RitzResult(theta[:kk].clone(), Y[:, :kk], resid[:kk].clone(), errors[:kk].clone(),
                      op.n_matvec - used, done, Y[:, :min(m, max(k + 2, s))])


@dataclass(frozen=True)
class SharpnessReading:
    """One sharpness measurement.

    Attributes:
        step: the caller's step number (or the update count when none was given).
        values, residuals, errors: top-``k`` eigenvalues (float64, largest first), their
            residuals and error estimates.
        lambda_max: ``values[0]``.
        lr, momentum: η and β used for the stability numbers (``lr`` may be None).
        lr_lambda_max: ``η·λ_max`` (None without ``lr``).
        stability_limit: ``2(1 + β)``; GD-type dynamics are unstable above it.
        n_hvp: Hessian-vector products this update cost.
        warm_started, converged: whether the solve began from the previous readings' Ritz
            vectors; whether every error reached ``tol``.
    """

    step: int
    values: Tensor
    residuals: Tensor
    errors: Tensor
    lambda_max: float
    lr: float | None
    momentum: float
    lr_lambda_max: float | None
    stability_limit: float
    n_hvp: int
    warm_started: bool
    converged: bool

    @property
    def edge_ratio(self) -> float | None:
        """``η·λ_max / (2(1 + β))``: 1 is the edge of stability."""
        return None if self.lr_lambda_max is None else self.lr_lambda_max / self.stability_limit


class SharpnessTracker:
    """Track the top-``k`` Hessian eigenvalues across training with warm-started eigensolves.

    Usage (e.g. every ``sharpness_every`` steps, on a fixed data subset)::

        tracker = nt.SharpnessTracker(lr=0.05, momentum=0.9)
        reading = tracker.update(model, loss_fn, (x_fixed, y_fixed), step=t)
        reading.lambda_max, reading.lr_lambda_max, reading.stability_limit

    Arguments as for ``top_eigenvalues`` (``k``, ``tol``, ``method``, ``param_filter``, ``mode``,
    ``hvp_method``, ``microbatch_size``, ``max_hvp``; ``block_size``: the number of previous Ritz
    vectors a warm start begins from, default ``k + 2``). ``history`` keeps every
    reading. Measure on a fixed data set (e.g. a few thousand examples): minibatch estimates are noisy.

    Args:
        k: how many of the largest eigenvalues (≥ 1).
        tol: relative accuracy of each eigenvalue (> 0).
        lr: η, for ``lr_lambda_max = η·λ_max``; None to report λ only.
        momentum: β in [0, 1), for the stability limit ``2(1 + β)``.
        method: ``"lanczos"`` or ``"power"`` (the cold solves; warm ones use the previous vectors).
        param_filter: which parameters θ spans: None (all trainable), a name prefix, a list of
            names / prefixes, or a predicate ``(name, tensor) -> bool``.
        mode: None (the model's current train/eval flags), ``"train"`` or ``"eval"``.
        hvp_method: ``"reverse"``, ``"forward_over_reverse"`` or ``"finite_difference"``.
        microbatch_size: at most this many samples per pass; None: the batches as given.
        max_hvp: the cap on Hessian-vector products per update; None for the default.
        block_size: previous Ritz vectors a warm start begins from (≥ ``k``); None for ``k + 2``.
        seed: seed of the random start vectors.

    Raises:
        TypeError: non-number or non-int arguments.
        ValueError: ``k`` or ``block_size`` out of range, ``tol`` or ``lr`` ≤ 0, ``momentum``
            outside [0, 1), an unknown ``method``, ``hvp_method`` or ``mode``. :meth:`update`
            raises as :func:`top_eigenvalues` does.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> tracker = nt.SharpnessTracker(lr=0.1)
        >>> reading = tracker.update(model, loss_fn, (x, y), step=0)
        >>> reading.stability_limit  # GD is stable while lr·λ_max < 2
        2.0
    """

    def __init__(self, *, k: int = 1, tol: float = 1e-3, lr: float | None = None,
                 momentum: float = 0.0, method: EigenMethod = "lanczos", param_filter: ParamFilter = None,
                 mode: Mode = None, hvp_method: HvpMethod = "reverse", microbatch_size: int | None = None,
                 max_hvp: int | None = None, block_size: int | None = None, seed: int = 0) -> None:
        self.k = check_int("k", k)
        self.tol = check_positive("tol", tol)
        self.lr = None if lr is None else check_positive("lr", lr)
        self.momentum = self._check_momentum(momentum)
        if method not in EIGEN_METHODS:
            raise ValueError(f"method must be one of {EIGEN_METHODS}, got {method!r}")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        check_mode(mode)
        self.method, self.param_filter, self.mode = method, param_filter, mode
        self.hvp_method, self.microbatch_size = hvp_method, microbatch_size
        self.max_hvp, self.seed = max_hvp, seed
        self.block_size = k + 2 if block_size is None else check_int("block_size", block_size, minimum=k)
        self.history: list[SharpnessReading] = []
        self._vectors: Tensor | None = None
        self._signature: tuple[Any, ...] | None = None

    @staticmethod
    def _check_momentum(momentum: float) -> float:
        m = check_positive("momentum", momentum, allow_zero=True)
        if m >= 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        return m

    def reset(self) -> None:
        """Forget the warm start (e.g. after a jump in the parameters)."""
        self._vectors, self._signature = None, None

    def update(self, model: nn.Module, loss_fn: LossFn, data: Any, *, step: int | None = None,
               lr: float | None = None, momentum: float | None = None,
               preconditioner: Any = None) -> SharpnessReading:
        """Measure the top eigenvalues now; ``lr``/``momentum`` override the constructor's (schedules)."""
        lr_now = self.lr if lr is None else check_positive("lr", lr)
        mom = self.momentum if momentum is None else self._check_momentum(momentum)
        warn_mode(model, self.mode, "SharpnessTracker.update", fixed_masks=True)
        with hessian_operator(model, loss_fn, data, mode=self.mode, method=self.hvp_method,
                              microbatch_size=self.microbatch_size, param_filter=self.param_filter,
                              seed=self.seed, warn=False) as hop:
            op: LinearOperator = hop
            if preconditioner is not None:
                op = CongruenceOperator(hop, preconditioner_diagonal(hop.space, preconditioner))
            sig = (hop.space.names, hop.space.shapes, hop.dtype, hop.device, preconditioner is None)
            start = self._vectors if sig == self._signature and self.method == "lanczos" else None
            warm = start is not None
            if start is not None:  # previous top block (k wanted + guards), module docstring
                gen = torch.Generator()
                gen.manual_seed(self.seed + len(self.history))
                res = warm_davidson(op, self.k, start[:, : self.block_size], tol=self.tol,
                                    max_matvec=self.max_hvp, generator=gen)
            else:  # random start: block Lanczos, block size k
                res = solve(op, self.k, self.tol, self.method, self.max_hvp, None, None,
                            self.seed + len(self.history), gap_after=COLD_GAP_AFTER)
        self._vectors, self._signature = res.block, sig
        lam = float(res.values[0])
        reading = SharpnessReading(
            step=len(self.history) if step is None else int(step), values=res.values,
            residuals=res.residuals, errors=res.errors, lambda_max=lam, lr=lr_now, momentum=mom,
            lr_lambda_max=None if lr_now is None else lr_now * lam,
            stability_limit=2.0 * (1.0 + mom), n_hvp=res.n_matvec, warm_started=warm,
            converged=res.converged)
        self.history.append(reading)
        return reading

    def values(self) -> Tensor:
        """``(updates,)`` float64 tensor of λ_max over the history."""
        return torch.tensor([r.lambda_max for r in self.history], dtype=torch.float64)
