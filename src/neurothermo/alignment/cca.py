"""SVCCA (Raghu et al. 2017): SVD-reduce each layer, then the mean canonical correlation.

For each layer: centre the columns (optionally standardise them, as platonic-rep does), take the
thin SVD ``X_c = U S Vᵀ`` and keep the top ``d`` directions — ``dims`` of them, or (``dims=None``)
the fewest that explain ``variance`` (default 99%, Raghu et al.) of the total variance. With
orthonormal ``U_a``, ``U_b`` the canonical correlations are the singular values of
``W_a U_aᵀ U_b W_b`` with ``W = diag(s/√(s² + λ))``; ``λ = 0`` is plain CCA, ``λ > 0`` is ridge-
regularised CCA (covariances ``S² + λI``), ``λ = ridge · mean(s²)`` of the kept directions. The
score is the mean of the ``min(d_a, d_b)`` canonical correlations, in [0, 1].

**N < D.** Plain CCA overfits when there are fewer samples than features: the two kept subspaces of
``R^N`` then share ``d_a + d_b − (N − 1)`` directions and every such canonical correlation is 1
whatever the data. A layer with ``N < D`` therefore gets ``ridge = 0.1`` unless ``ridge`` is given,
with an :class:`AlignmentWarning`; compare such numbers only through a permutation null.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo._validate import check_int
from neurothermo.alignment._common import (
    AlignmentWarning,
    centre,
    check_not_constant,
    preprocess,
)
from neurothermo.alignment._spec import pairwise, register

DEFAULT_RIDGE = 0.1


@dataclass(frozen=True)
class _SvStat:
    u: Tensor  # (N, d) orthonormal basis of the kept directions
    w: Tensor  # (d,) ridge shrinkage s/√(s²+λ) (ones without ridge)


class Svcca:
    name = "svcca"
    higher_is_more_aligned = True
    symmetric = True

    def __init__(
        self, dims: int | None = None, *, variance: float = 0.99, ridge: float | None = None,
        standardize: bool = False, normalize: bool = False, clip_quantile: float | None = None,
    ) -> None:
        if dims is not None:
            check_int("dims", dims, minimum=1)
        if not (0.0 < float(variance) <= 1.0):
            raise ValueError(f"variance must be in (0, 1], got {variance!r}")
        if ridge is not None and not float(ridge) >= 0.0:
            raise ValueError(f"ridge must be >= 0 (or None), got {ridge!r}")
        self.dims = dims
        self.variance = float(variance)
        self.ridge = ridge
        self.standardize = bool(standardize)
        self.normalize = bool(normalize)
        self.clip_quantile = clip_quantile

    def prepare(self, x: Tensor, name: str) -> _SvStat:
        n, d = x.shape
        if n < 2:
            raise ValueError(f"{name} has N={n} sample; SVCCA needs N >= 2")
        x = preprocess(x, normalize=self.normalize, clip_quantile=self.clip_quantile)
        xc = centre(x)
        check_not_constant(xc, x, name, "SVCCA")
        if self.standardize:
            std = xc.std(dim=0, keepdim=True)
            xc = xc / torch.where(std > 0, std, torch.ones_like(std))
        u, s, _ = torch.linalg.svd(xc, full_matrices=False)
        rank = int((s > s[0] * max(n, d) * torch.finfo(torch.float64).eps).sum())
        if self.dims is not None:
            if self.dims > rank:
                raise ValueError(
                    f"dims={self.dims} but {name} has only {rank} non-degenerate directions "
                    f"(N={n}, D={d}, rank after centring ≤ N−1); use dims <= {rank}"
                )
            keep = self.dims
        else:
            frac = torch.cumsum(s.square(), 0) / s.square().sum()
            keep = min(rank, int((frac < self.variance - 1e-12).sum()) + 1)
        u, s = u[:, :keep], s[:keep]
        ridge = self.ridge
        if ridge is None and n < d:
            warnings.warn(
                f"{name} has fewer samples than features (N={n} < D={d}): plain CCA would find "
                f"canonical correlations of 1 by chance, so ridge-regularised CCA is used "
                f"(ridge={DEFAULT_RIDGE} × mean retained variance). Pass ridge= (0 disables it) "
                "or dims= explicitly, and compare against permutation_null",
                AlignmentWarning,
                stacklevel=4,
            )
            ridge = DEFAULT_RIDGE
        if ridge:
            lam = float(ridge) * s.square().mean()
            w = s / torch.sqrt(s.square() + lam)
        else:
            w = torch.ones_like(s)
        return _SvStat(u, w)

    def compare(self, sa: _SvStat, sb: _SvStat) -> Tensor:
        m = (sa.u * sa.w).T @ (sb.u * sb.w)
        rho = torch.linalg.svdvals(m).clamp(max=1.0)
        result: Tensor = rho[: min(m.shape)].mean()
        return result

    def permute(self, stat: _SvStat, perm: Tensor) -> _SvStat:
        return _SvStat(stat.u[perm], stat.w)


def svcca(
    A: Tensor, B: Tensor, dims: int | None = None, *, variance: float = 0.99,
    ridge: float | None = None, standardize: bool = False, normalize: bool = False,
    clip_quantile: float | None = None,
) -> float:
    """Mean canonical correlation after SVD reduction (see the module docstring).

    ``dims``: directions kept per layer (``None``: enough for ``variance`` of the variance;
    platonic-rep keeps 10 after standardising each column). ``standardize=True`` z-scores columns
    first (platonic-rep; this breaks rotation invariance). Without ridge and with all directions kept
    it is invariant to any invertible linear map of either layer; the SVD truncation keeps it
    invariant to rotations, isotropic scaling, translations and column permutations. Symmetric.
    ``N < D`` warns and regularises (ridge 0.1) unless ``ridge`` is given.

    Args:
        A: ``(N, D_a)`` features of the N samples (a tensor or array; any device).
        B: ``(N, D_b)`` features of the same samples, in the same order, on the same device.
        dims: SVD directions kept per layer (≥ 1); None: enough for ``variance``.
        variance: the fraction in (0, 1] of variance the kept directions explain (``dims=None``).
        ridge: CCA regularisation (≥ 0); None: 0, or 0.1 with a warning when N < D.
        standardize: z-score columns first (breaks rotation invariance).
        normalize: L2-normalise rows first (cosine geometry).
        clip_quantile: clip outliers with :func:`clip_outliers` at this quantile first; None: off.

    Returns:
        The mean canonical correlation, in [0, 1].

    Raises:
        TypeError: features that are not a real (N, D) tensor or array, or complex.
        ValueError: features not 2-D, empty, with NaN/Inf, with different N or devices, or constant
            across samples, fewer than 2 samples, ``dims`` < 1, ``variance`` outside (0, 1],
            ``ridge`` < 0; ``clip_quantile`` outside (0, 1].

    Warns:
        AlignmentWarning: N < D without ``ridge`` (regularised CCA is used).

    Example:
        >>> import torch
        >>> from neurothermo import alignment
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(200, 16)
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16))  # a random rotation
        >>> round(alignment.svcca(A, A @ Q), 6)
        1.0
    """
    metric = Svcca(dims, variance=variance, ridge=ridge, standardize=standardize,
                   normalize=normalize, clip_quantile=clip_quantile)
    return pairwise(metric, A, B)


register("svcca", svcca, Svcca)
