"""``SharpnessTracker``: λ_max during training, warm-started from the previous eigenvectors.

Each ``update`` runs block Lanczos (``lanczos.py``) started from the top Ritz vectors of the
previous update instead of random vectors: the ``k`` wanted plus one guard (block size ``k + 1``).
When the landscape moved little, the start block is already close to the top eigenspace, so two or
three block steps certify the eigenvalues (the Ritz-gap error estimate is trusted from two block
steps on, against twenty basis vectors for a random start). The guard matters when the top
eigenvalues are close or cross between updates: started from the old top vector alone, Lanczos can
certify the eigenvector of the *second* eigenvalue before it has seen the new top, and then keep
following it. Measured in ``benchmarks/bench_curvature.py`` (ReLU MLP on digits, SGD, k = 1,
tol = 1e-3, updates where λ_max moved < 5%): median 8 products (cold start: 16), 76% of updates
≤ 10, max 16, none off by more than the tolerance; on a tanh MLP (``tests/test_curvature_tracker.py``)
every such update took ≤ 8. The cost is set by the tolerance: near-degenerate top eigenvalues need
more products to be told apart. The warm start is dropped when the parameter set changed (or after
``reset()``).

Stability (THEORY.md §4, Cohen et al. 2021): gradient descent with learning rate η is stable on a
quadratic while ``η·λ_max < 2``; heavy-ball momentum β moves the limit to ``2(1 + β)``
(``torch.optim.SGD(momentum=β, dampening=0)``). Each reading reports ``η·λ_max`` against that limit.
For adaptive methods pass ``preconditioner`` (``Λ`` of the step ``−η Λ g``): the reading is then the
top eigenvalue of ``Λ^{1/2} H Λ^{1/2}`` (for Adam, whose limit also depends on β₁, the ratio is
only indicative).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._state import ParamFilter
from neurothermo._validate import check_int, check_positive
from neurothermo.curvature.eigen import EIGEN_METHODS, preconditioner_diagonal, solve
from neurothermo.curvature.hvp import HVP_METHODS, LossFn, hessian_operator
from neurothermo.curvature.operator import CongruenceOperator, LinearOperator

COLD_GAP_AFTER = 20  # cold starts trust Ritz gaps from 20 basis vectors (lanczos.py)


@dataclass(frozen=True)
class SharpnessReading:
    """One sharpness measurement.

    step:                the caller's step number (or the update count when none was given).
    values, residuals, errors: top-``k`` eigenvalues (float64, largest first) and their estimates.
    lambda_max:          ``values[0]``.
    lr, momentum:        η and β used for the stability numbers (``lr`` may be None).
    lr_lambda_max:       ``η·λ_max`` (None without ``lr``).
    stability_limit:     ``2(1 + β)``; GD-type dynamics are unstable above it.
    n_hvp:               Hessian-vector products this update cost.
    warm_started, converged: as named.
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
    """Track the top-``k`` Hessian eigenvalues across training with warm-started Lanczos.

    Usage (e.g. every ``sharpness_every`` steps, on a fixed data subset)::

        tracker = nt.SharpnessTracker(lr=0.05, momentum=0.9)
        reading = tracker.update(model, loss_fn, (x_fixed, y_fixed), step=t)
        reading.lambda_max, reading.lr_lambda_max, reading.stability_limit

    Arguments as for ``top_eigenvalues`` (``k``, ``tol``, ``method``, ``param_filter``, ``mode``,
    ``hvp_method``, ``microbatch_size``, ``max_hvp``; ``block_size`` of warm starts defaults to
    ``k + 1`` here). ``history`` keeps every
    reading. Measure on a fixed data set (e.g. a few thousand examples): minibatch estimates are noisy.
    """

    def __init__(self, *, k: int = 1, tol: float = 1e-3, lr: float | None = None,
                 momentum: float = 0.0, method: str = "lanczos", param_filter: ParamFilter = None,
                 mode: str = "eval", hvp_method: str = "reverse", microbatch_size: int | None = None,
                 max_hvp: int | None = None, block_size: int | None = None, seed: int = 0) -> None:
        self.k = check_int("k", k)
        self.tol = check_positive("tol", tol)
        self.lr = None if lr is None else check_positive("lr", lr)
        self.momentum = self._check_momentum(momentum)
        if method not in EIGEN_METHODS:
            raise ValueError(f"method must be one of {EIGEN_METHODS}, got {method!r}")
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        self.method, self.param_filter, self.mode = method, param_filter, mode
        self.hvp_method, self.microbatch_size = hvp_method, microbatch_size
        self.max_hvp, self.seed = max_hvp, seed
        self.block_size = k + 1 if block_size is None else check_int("block_size", block_size, minimum=k)
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
        with hessian_operator(model, loss_fn, data, mode=self.mode, method=self.hvp_method,
                              microbatch_size=self.microbatch_size, param_filter=self.param_filter,
                              seed=self.seed) as hop:
            op: LinearOperator = hop
            if preconditioner is not None:
                op = CongruenceOperator(hop, preconditioner_diagonal(hop.space, preconditioner))
            sig = (hop.space.names, hop.space.shapes, hop.dtype, hop.device, preconditioner is None)
            start = self._vectors if sig == self._signature and self.method == "lanczos" else None
            warm = start is not None
            # warm: the previous top block (k wanted + guard) is the start block; Ritz gaps are
            # trusted after two block steps. Cold: random start, the first update uses block size k.
            res = solve(op, self.k, self.tol, self.method, self.max_hvp,
                        self.block_size if warm else None,
                        None if start is None else start[:, : self.block_size],
                        self.seed + len(self.history),
                        gap_after=2 * self.block_size if warm else COLD_GAP_AFTER)
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
