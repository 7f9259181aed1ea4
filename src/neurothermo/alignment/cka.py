"""Centred kernel alignment (Kornblith et al. 2019), biased and unbiased, linear and RBF.

``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))`` with kernels ``K_ij = k(a_i, a_j)``,
``L_ij = k(b_i, b_j)`` on the ``N`` paired samples.

* biased HSIC ``= tr(K H L H)/(N−1)²`` with ``H = I − 11ᵀ/N`` (the constant cancels in CKA);
* unbiased HSIC (Song et al. 2012, eq. 5), with ``K̃``, ``L̃`` the kernels with zeroed diagonals:
  ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((N−1)(N−2)) − 2/(N−2)·1ᵀK̃L̃1] / (N(N−3))``; needs ``N ≥ 4``; equal to
  the inner product of U-centred kernels, so it is unchanged by ``K_ij → K_ij + u_i + u_j`` and
  unbiased CKA of independent features is 0 on average.

Linear kernel: computed in **feature space**, ``HSIC_biased ∝ ‖A_cᵀB_c‖²_F`` (``A_c`` = column-
centred ``A``), and the unbiased terms from ``A_cᵀB_c`` and the row norms ``r_i = ‖a_ci‖²``:
``tr(K̃L̃) = ‖A_cᵀB_c‖² − Σ r_i s_i``, ``1ᵀK̃1 = −Σ r_i``, ``1ᵀK̃L̃1 = Σ r_i s_i`` — ``O(N·D_a·D_b)``
time, no ``N × N`` matrix at all (platonic-rep builds an explicit ``N × N`` centring matrix:
``O(N³)``). When ``D > N`` the features are first compressed to ``N`` columns with the same Gram.
RBF kernel ``exp(−‖a_i − a_j‖²/(2σ²))``: ``O(N²)`` memory. All sums in float64.

No ``+1e-6`` in the denominator (platonic-rep adds one, which breaks scale invariance): constant
features raise instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.alignment._common import (
    centre,
    check_not_constant,
    compress,
    preprocess,
)
from neurothermo.alignment._spec import pairwise, register


@dataclass(frozen=True)
class _LinearStat:
    x: Tensor  # (N, D') centred (and compressed) float64 features
    r: Tensor  # (N,) squared row norms of x
    self_hsic: Tensor


@dataclass(frozen=True)
class _KernelStat:
    k: Tensor  # (N, N) centred (biased) or U-centred (unbiased) kernel, float64
    self_hsic: Tensor


class Cka:
    higher_is_more_aligned = True
    symmetric = True
    name = "cka"

    def __init__(
        self, kernel: str = "linear", *, unbiased: bool = False, sigma: float | None = None,
        normalize: bool = False, clip_quantile: float | None = None,
    ) -> None:
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
        if sigma is not None:
            if kernel != "rbf":
                raise ValueError("sigma is the RBF bandwidth; it needs kernel='rbf'")
            if not float(sigma) > 0:
                raise ValueError(f"sigma must be > 0 (or None for the median heuristic), got {sigma!r}")
        self.kernel = kernel
        self.unbiased = bool(unbiased)
        self.sigma = sigma
        self.normalize = bool(normalize)
        self.clip_quantile = clip_quantile

    def _check_n(self, n: int, name: str) -> None:
        if self.unbiased and n <= 3:
            raise ValueError(
                f"{name} has N={n} samples; unbiased CKA needs N >= 4 (the estimator divides by "
                "N(N−3)); use more samples or unbiased=False"
            )
        if n < 2:
            raise ValueError(f"{name} has N={n} sample; CKA needs N >= 2")

    def prepare(self, x: Tensor, name: str) -> _LinearStat | _KernelStat:
        n = x.shape[0]
        self._check_n(n, name)
        x = preprocess(x, normalize=self.normalize, clip_quantile=self.clip_quantile)
        xc = centre(x)
        check_not_constant(xc, x, name, "CKA")
        if self.kernel == "linear":
            xc = compress(xc)
            stat = _LinearStat(xc, xc.square().sum(dim=1), torch.zeros((), dtype=torch.float64))
            self_hsic = self._linear(stat, stat)
            if not bool(self_hsic > 0):
                raise ValueError(
                    f"{name}: its unbiased HSIC with itself is {float(self_hsic):.3g} (not positive), "
                    "so unbiased CKA is undefined; use more samples or unbiased=False"
                )
            return _LinearStat(stat.x, stat.r, self_hsic)
        k = _rbf_kernel(xc, self.sigma)
        k = _u_centre(k) if self.unbiased else _centre_kernel(k)
        self_hsic = (k * k).sum()
        if not bool(self_hsic > 0):
            raise ValueError(f"{name}: its centred RBF kernel vanishes; CKA is undefined (try a larger sigma)")
        return _KernelStat(k, self_hsic)

    def _linear(self, sa: _LinearStat, sb: _LinearStat) -> Tensor:
        cross = (sa.x.T @ sb.x).square().sum()
        if not self.unbiased:
            return cross
        n = sa.x.shape[0]
        rr = sa.r @ sb.r
        t1 = cross - rr
        return (t1 + sa.r.sum() * sb.r.sum() / ((n - 1) * (n - 2)) - 2.0 * rr / (n - 2)) / (n * (n - 3))

    def compare(self, sa: _LinearStat | _KernelStat, sb: _LinearStat | _KernelStat) -> Tensor:
        if isinstance(sa, _LinearStat) and isinstance(sb, _LinearStat):
            hsic = self._linear(sa, sb)
        else:
            assert isinstance(sa, _KernelStat) and isinstance(sb, _KernelStat)
            hsic = (sa.k * sb.k).sum()
        return hsic / torch.sqrt(sa.self_hsic * sb.self_hsic)

    def permute(self, stat: _LinearStat | _KernelStat, perm: Tensor) -> _LinearStat | _KernelStat:
        if isinstance(stat, _LinearStat):
            return _LinearStat(stat.x[perm], stat.r[perm], stat.self_hsic)
        return _KernelStat(stat.k[perm][:, perm], stat.self_hsic)


def _rbf_kernel(xc: Tensor, sigma: float | None) -> Tensor:
    """``exp(−d²_ij / (2σ²))``; ``σ = None``: ``σ² = median of d²_ij over i < j`` (Kornblith's rule)."""
    sq = xc.square().sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (xc @ xc.T)).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    if sigma is None:
        n = d2.shape[0]
        iu = torch.triu_indices(n, n, offset=1, device=d2.device)
        med = d2[iu[0], iu[1]].median()
        if not bool(med > 0):
            raise ValueError(
                "the median pairwise distance is 0 (most samples coincide), so the RBF bandwidth "
                "is undefined; pass sigma explicitly"
            )
        s2 = med
    else:
        s2 = torch.tensor(float(sigma) ** 2, dtype=d2.dtype, device=d2.device)
    return torch.exp(-d2 / (2.0 * s2))


def _centre_kernel(k: Tensor) -> Tensor:
    """``H K H`` without forming ``H``: subtract row and column means, add the grand mean."""
    row = k.mean(dim=1, keepdim=True)
    col = k.mean(dim=0, keepdim=True)
    return k - row - col + k.mean()


def _u_centre(k: Tensor) -> Tensor:
    """Székely–Rizzo U-centring: ``⟨U(K), U(L)⟩/(N(N−3))`` is the unbiased HSIC of Song et al."""
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0.0)
    row = k.sum(dim=1, keepdim=True) / (n - 2)
    col = k.sum(dim=0, keepdim=True) / (n - 2)
    u = k - row - col + k.sum() / ((n - 1) * (n - 2))
    u.fill_diagonal_(0.0)
    return u


def cka(
    A: Tensor, B: Tensor, kernel: str = "linear", *, unbiased: bool = False,
    sigma: float | None = None, normalize: bool = False, clip_quantile: float | None = None,
) -> float:
    """Centred kernel alignment of two ``(N, D)`` feature matrices (see the module docstring).

    ``kernel="linear"`` (default) or ``"rbf"`` with bandwidth ``sigma`` (``None``: the median
    pairwise distance, so the value is scale invariant; platonic-rep uses ``sigma=1`` on
    L2-normalised rows). ``unbiased=False`` is Kornblith's CKA (platonic-rep's default); ``True``
    uses the unbiased HSIC (``N ≥ 4``; its value for independent features is 0 on average, and it
    can be negative). ``normalize`` L2-normalises rows first (platonic-rep's pipeline does, for every
    metric; Kornblith's CKA does not, and neither do we by default). Invariant to rotations,
    isotropic scaling, translations and column permutations; in [0, 1] (biased), ≤ 1 (unbiased);
    symmetric; 1 for identical inputs. Raises for constant features.

    Args:
        A: ``(N, D_a)`` features of the N samples (a tensor or array; any device).
        B: ``(N, D_b)`` features of the same samples, in the same order, on the same device.
        kernel: ``"linear"`` or ``"rbf"``.
        unbiased: the unbiased HSIC (N ≥ 4) instead of Kornblith's biased one.
        sigma: the RBF bandwidth (> 0; only with ``kernel="rbf"``); None: the median pairwise
            distance.
        normalize: L2-normalise rows first (cosine geometry).
        clip_quantile: clip outliers with :func:`clip_outliers` at this quantile first; None: off.

    Returns:
        CKA, in [0, 1] (biased) or ≤ 1 (unbiased).

    Raises:
        TypeError: features that are not a real (N, D) tensor or array, or complex.
        ValueError: features not 2-D, empty, with NaN/Inf, with different N or devices, or constant
            across samples, fewer than 2 samples (4 when unbiased), an unknown ``kernel``, ``sigma``
            ≤ 0 or without ``kernel='rbf'``, a vanishing RBF kernel;
            ``clip_quantile`` outside (0, 1].

    Example:
        >>> import torch
        >>> from neurothermo import alignment
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(200, 16)
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16))  # a random rotation
        >>> round(alignment.cka(A, 2 * A @ Q + 1.0), 6)  # rotation, scale and shift
        1.0
    """
    metric = Cka(kernel, unbiased=unbiased, sigma=sigma, normalize=normalize, clip_quantile=clip_quantile)
    return pairwise(metric, A, B)


register("cka", cka, Cka)
