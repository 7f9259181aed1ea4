"""Nearest-neighbour alignment: mutual k-NN, cycle k-NN and CKNNA (Huh et al. 2024, platonic-rep).

Neighbours of sample ``i`` in a layer ``X`` (rows ``x_i``): the ``k`` samples ``j ≠ i`` with the
largest similarity ``s_ij = x̂_i · x̂_j``, where ``x̂ = x/‖x‖`` when ``normalize=True`` (cosine,
platonic-rep's default) and ``x̂ = x`` otherwise (inner product). **Ties** are broken toward the
lower sample index — the order a stable full sort gives — so results never depend on the block size,
the device or the top-k kernel. They are found block by block with ``torch.topk`` on rows of the
Gram matrix (``O(N²·D)`` time, ``O(block·N)`` memory), never with a full sort of the ``N × N``
matrix. ``k`` may be at most ``N − 1``.

* ``mutual_knn = (1/N) Σ_i |N_A(i) ∩ N_B(i)| / k`` ∈ [0, 1]; under independence its mean is
  ``k/(N − 1)``.
* ``cycle_knn = (1/N) Σ_i 1[∃ j ∈ N_B(i): i ∈ N_A(j)]``: leave ``i`` through B's neighbours and come
  back through A's (not symmetric).
* ``cknna``: CKA restricted to mutual neighbours, see :func:`cknna`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.alignment._common import (
    AlignmentWarning,
    centre,
    check_k,
    check_not_constant,
    inverse_permutation,
    preprocess,
)
from neurothermo.alignment._spec import pairwise, register

_BLOCK_ELEMENTS = 1 << 24  # 16 M similarities per block: 64 MB in float32


def knn_indices(
    x: Tensor, k: int, *, exclude_self: bool = True, block_rows: int | None = None
) -> Tensor:
    """``(N, k)`` int64: row ``i`` holds the ``k`` largest-``x_i·x_j`` indices ``j``, ascending.

    ``exclude_self`` leaves ``j = i`` out. Ties at the k-th place go to the lower index. Rows are
    sorted by index (a neighbour *set*; its order carries no information).

    Args:
        x: ``(N, D)`` features (normalise rows first for cosine neighbours).
        k: neighbours per row (1 ≤ k ≤ N − 1, or ≤ N with ``exclude_self=False``).
        exclude_self: leave ``j = i`` out.
        block_rows: rows of the ``x·xᵀ`` similarity computed at once (bounds the memory);
            None: chosen from N.

    Returns:
        ``(N, k)`` int64 neighbour indices, each row ascending.

    Raises:
        TypeError: a non-int ``k``.
        ValueError: ``k`` out of range. ``x`` itself is not checked here (a low-level helper):
            pass a finite ``(N, D)`` tensor; the metrics check theirs.

    Example:
        >>> import torch
        >>> from neurothermo.alignment import knn_indices
        >>> x = torch.tensor([[0.0], [1.0], [1.1], [5.0]])
        >>> knn_indices(x, 1).flatten().tolist()  # the largest inner product x_i·x_j
        [1, 3, 3, 2]
    """
    n = x.shape[0]
    check_k(k, n, "the features", include_self=not exclude_self)
    rows = block_rows or max(1, min(n, _BLOCK_ELEMENTS // n))
    take = min(k + 1, n)  # one more than needed, to see whether the k-th place is tied
    out = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        s = x[start:stop] @ x.T  # (m, N)
        if exclude_self:
            local = torch.arange(stop - start, device=x.device)
            s[local, local + start] = -torch.inf
        vals, idx = torch.topk(s, take, dim=1)
        idx = idx[:, :k]
        if take > k:
            tied = vals[:, k - 1] == vals[:, k]
            if bool(tied.any()):
                rows_t = tied.nonzero().squeeze(1)
                st = s[rows_t]
                t = vals[rows_t, k - 1 : k]
                greater = st > t
                equal = st == t
                need = k - greater.sum(dim=1, keepdim=True)
                chosen = greater | (equal & (equal.cumsum(dim=1) <= need))
                idx[rows_t] = chosen.nonzero()[:, 1].view(-1, k)
        out[start:stop] = idx.sort(dim=1).values
    return out


def _permute_indices(idx: Tensor, perm: Tensor) -> Tensor:
    """Neighbour sets of ``x[perm]`` from those of ``x``: relabel rows and entries."""
    inv = inverse_permutation(perm)
    return inv[idx[perm]].sort(dim=1).values


def _preprocess_varying(x: Tensor, name: str, normalize: bool, clip_quantile: float | None) -> Tensor:
    """Preprocess, then refuse features that do not vary across samples (as CKA does).

    Constant features (or, with ``normalize``, rows that are all positive multiples of one vector)
    make every similarity equal: the neighbour sets would be decided by index ties alone, and two
    such layers would score "perfect alignment". Every metric raises on them alike.
    """
    xp = preprocess(x, normalize=normalize, clip_quantile=clip_quantile)
    check_not_constant(centre(xp), xp, name, "its neighbour structure")
    return xp


@dataclass(frozen=True)
class _KnnStat:
    idx: Tensor  # (N, k) neighbour sets


class _KnnBase:
    higher_is_more_aligned = True
    symmetric = True
    name = "knn"

    def __init__(self, k: int = 10, *, normalize: bool = True, clip_quantile: float | None = None) -> None:
        self.k = k
        self.normalize = bool(normalize)
        self.clip_quantile = clip_quantile

    def prepare(self, x: Tensor, name: str) -> _KnnStat:
        check_k(self.k, x.shape[0], name)
        x = _preprocess_varying(x, name, self.normalize, self.clip_quantile)
        return _KnnStat(knn_indices(x, self.k))

    def permute(self, stat: _KnnStat, perm: Tensor) -> _KnnStat:
        return _KnnStat(_permute_indices(stat.idx, perm))


class MutualKnn(_KnnBase):
    name = "mutual_knn"

    def compare(self, sa: _KnnStat, sb: _KnnStat) -> Tensor:
        # rows are sorted sets: j ∈ N_B(i) iff it sits where searchsorted puts it
        pos = torch.searchsorted(sb.idx, sa.idx).clamp_(max=self.k - 1)
        overlap = (sb.idx.gather(1, pos) == sa.idx).sum()
        return overlap.to(torch.float64) / (sa.idx.shape[0] * self.k)


class CycleKnn(_KnnBase):
    name = "cycle_knn"
    symmetric = False

    def compare(self, sa: _KnnStat, sb: _KnnStat) -> Tensor:
        n = sa.idx.shape[0]
        back = sa.idx[sb.idx]  # (N, k, k): A-neighbours of each B-neighbour of i
        home = torch.arange(n, device=back.device).view(n, 1, 1)
        return (back == home).flatten(1).any(dim=1).to(torch.float64).mean()


def mutual_knn(
    A: Tensor, B: Tensor, k: int = 10, *, normalize: bool = True, clip_quantile: float | None = None
) -> float:
    """Mutual nearest-neighbour alignment ``(1/N) Σ_i |N_A(i) ∩ N_B(i)| / k`` (Huh et al. 2024).

    ``normalize=True`` uses cosine similarity (platonic-rep), ``False`` the raw inner product;
    ``clip_quantile`` (default off; platonic-rep's pipeline uses 0.95) clips outliers first.
    Symmetric, in [0, 1], 1 for identical inputs; invariant to rotations and column permutations,
    and to isotropic scale; not to translations (no centring). Independent features give
    ``k/(N − 1)`` on average.

    Args:
        A: ``(N, D_a)`` features of the N samples (a tensor or array; any device).
        B: ``(N, D_b)`` features of the same samples, in the same order, on the same device.
        k: neighbours per sample (1 ≤ k ≤ N − 1).
        normalize: L2-normalise rows first (cosine geometry).
        clip_quantile: clip outliers with :func:`clip_outliers` at this quantile first; None: off.

    Returns:
        The mean fraction of shared neighbours, in [0, 1].

    Raises:
        TypeError: features that are not a real (N, D) tensor or array, or complex.
        ValueError: features not 2-D, empty, with NaN/Inf, with different N or devices, or
            constant across samples, ``k`` out of range; ``clip_quantile`` outside (0, 1].

    Example:
        >>> import torch
        >>> from neurothermo import alignment
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(200, 16)
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16))  # a random rotation
        >>> alignment.mutual_knn(A, 3 * A @ Q, k=10)  # the same neighbours
        1.0
    """
    return pairwise(MutualKnn(k, normalize=normalize, clip_quantile=clip_quantile), A, B)


def cycle_knn(
    A: Tensor, B: Tensor, k: int = 10, *, normalize: bool = True, clip_quantile: float | None = None
) -> float:
    """Cycle k-NN ``(1/N) Σ_i 1[∃ j ∈ N_B(i) with i ∈ N_A(j)]`` (platonic-rep's ``cycle_knn``).

    Not symmetric. Independent features give about ``1 − (1 − k/(N−1))^k`` on average.

    Args:
        A: ``(N, D_a)`` features of the N samples (a tensor or array; any device).
        B: ``(N, D_b)`` features of the same samples, in the same order, on the same device.
        k: neighbours per sample (1 ≤ k ≤ N − 1).
        normalize: L2-normalise rows first (cosine geometry).
        clip_quantile: clip outliers with :func:`clip_outliers` at this quantile first; None: off.

    Returns:
        The fraction of samples whose B-neighbourhood leads back to them in A, in [0, 1].

    Raises:
        TypeError: features that are not a real (N, D) tensor or array, or complex.
        ValueError: features not 2-D, empty, with NaN/Inf, with different N or devices, or
            constant across samples, ``k`` out of range; ``clip_quantile`` outside (0, 1].

    Example:
        >>> import torch
        >>> from neurothermo import alignment
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(200, 16)
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16))  # a random rotation
        >>> alignment.cycle_knn(A, A @ Q, k=10)
        1.0
    """
    return pairwise(CycleKnn(k, normalize=normalize, clip_quantile=clip_quantile), A, B)


@dataclass(frozen=True)
class _CknnaStat:
    idx: Tensor  # (N, k) neighbour sets (self included when unbiased=False)
    val: Tensor  # (N, k) float64 kernel values K_ij at those neighbours
    self_sim: Tensor  # 0-d: the layer's masked HSIC with itself


class Cknna:
    """CKA on the kernels masked to mutual k-nearest neighbours (Huh et al. 2024)."""

    name = "cknna"
    higher_is_more_aligned = True
    symmetric = False  # unbiased HSIC of non-symmetric masked kernels is not (platonic-rep's neither)

    def __init__(
        self, k: int = 10, *, unbiased: bool = True, normalize: bool = True,
        clip_quantile: float | None = None,
    ) -> None:
        self.k = k
        self.unbiased = bool(unbiased)
        self.symmetric = not self.unbiased
        self.normalize = bool(normalize)
        self.clip_quantile = clip_quantile

    def prepare(self, x: Tensor, name: str) -> _CknnaStat:
        n = x.shape[0]
        if self.unbiased and n <= 3:
            raise ValueError(
                f"{name} has N={n} samples; the unbiased HSIC in CKNNA needs N >= 4 (it divides by "
                "N(N−3)); use more samples or unbiased=False"
            )
        check_k(self.k, n, name, include_self=not self.unbiased)
        if self.k < 2:
            raise ValueError(f"cknna needs k >= 2 (got k={self.k}): one neighbour leaves no kernel to compare")
        x = _preprocess_varying(x, name, self.normalize, self.clip_quantile)
        idx = knn_indices(x, self.k, exclude_self=self.unbiased)
        xd = x.to(torch.float64)
        val = torch.einsum("nd,nkd->nk", xd, xd[idx])
        stat = _CknnaStat(idx, val, torch.zeros((), dtype=torch.float64))
        self_sim = self._hsic(stat, stat)
        if not bool(self_sim > 0):
            raise ValueError(
                f"CKNNA is undefined for {name}: its masked HSIC with itself is {float(self_sim):.3g} "
                "(not positive; e.g. constant features or too few samples); use a larger k or "
                "unbiased=False"
            )
        return _CknnaStat(idx, val, self_sim)

    def permute(self, stat: _CknnaStat, perm: Tensor) -> _CknnaStat:
        inv = inverse_permutation(perm)
        idx, val = inv[stat.idx[perm]], stat.val[perm]
        order = idx.argsort(dim=1)
        return _CknnaStat(idx.gather(1, order), val.gather(1, order), stat.self_sim)

    def _hsic(self, sa: _CknnaStat, sb: _CknnaStat) -> Tensor:
        """HSIC of ``K̃ = M∘K`` and ``L̃ = M∘L``, ``M`` the mutual-neighbour mask, in O(N k²)."""
        n = sa.idx.shape[0]
        match = sa.idx.unsqueeze(2) == sb.idx.unsqueeze(1)  # (N, k, k)
        in_a, in_b = match.any(dim=2), match.any(dim=1)  # positions of M in each row list
        kv = torch.where(in_a, sa.val, 0.0)
        lv = torch.where(in_b, sb.val, 0.0)
        # Both rows list M(i) in ascending index order, so the r-th kept entries pair up.
        cols = sa.idx[in_a]  # j for every (i, j) in M, row-major
        rows = torch.arange(n, device=cols.device).repeat_interleave(in_a.sum(dim=1))
        k_m, l_m = sa.val[in_a], sb.val[in_b]
        # tr(K̃ L̃) = Σ_{(i,j)∈M, (j,i)∈M} K_ij L_ji, and L_ji = L_ij (symmetric kernel).
        codes = rows * n + cols
        rev = cols * n + rows
        if codes.numel() > 0:
            pos = torch.searchsorted(codes, rev).clamp(max=codes.numel() - 1)
            t1 = (k_m * l_m * (codes[pos] == rev)).sum()
        else:  # no mutual neighbours at all
            t1 = torch.zeros((), dtype=torch.float64, device=kv.device)
        row_k, row_l = kv.sum(dim=1), lv.sum(dim=1)
        col_k = torch.zeros(n, dtype=torch.float64, device=kv.device).index_add_(0, cols, k_m)
        col_l = torch.zeros(n, dtype=torch.float64, device=kv.device).index_add_(0, cols, l_m)
        sum_k, sum_l = row_k.sum(), row_l.sum()
        if self.unbiased:  # Song et al. (2012), eq. 5; diagonals are zero (self excluded)
            return (t1 + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * (col_k @ row_l) / (n - 2)) / (
                n * (n - 3)
            )
        # tr(K̃ H L̃ H), H = I − 11ᵀ/N (platonic-rep's hsic_biased, no constant factor)
        return t1 - (col_l @ row_k + col_k @ row_l) / n + sum_k * sum_l / n**2

    def compare(self, sa: _CknnaStat, sb: _CknnaStat) -> Tensor:
        value = self._hsic(sa, sb) / torch.sqrt(sa.self_sim * sb.self_sim)
        if bool(value.abs() > 1):
            warnings.warn(
                f"CKNNA = {float(value):.4f} lies outside [-1, 1]: the masked kernels M∘K are not "
                "positive semi-definite, so HSIC obeys no Cauchy–Schwarz bound on them (duplicated "
                "or tied rows make this likely). Deduplicate the samples, or compare with "
                "mutual_knn or cka, which are bounded", AlignmentWarning, stacklevel=2)
        return value


def cknna(
    A: Tensor, B: Tensor, k: int = 10, *, unbiased: bool = True, normalize: bool = True,
    clip_quantile: float | None = None,
) -> float:
    """CKNNA: ``HSIC(M∘K, M∘L) / sqrt(HSIC(M_A∘K, M_A∘K)·HSIC(M_B∘L, M_B∘L))`` (Huh et al. 2024).

    ``K = X̂X̂ᵀ``, ``L = ŶŶᵀ`` (cosine by default), ``M`` the mask of mutual k-nearest neighbours
    (``M_ij = 1`` iff ``j ∈ N_A(i) ∩ N_B(i)``), ``M_A`` (``M_B``) the layer's own k-NN mask. With
    ``unbiased=True`` (platonic-rep's default) self is excluded from the neighbours and HSIC is Song
    et al.'s unbiased estimator (needs N ≥ 4); otherwise self may be a neighbour and HSIC is
    ``tr(K̃HL̃H)``. Computed from the ``N·k`` neighbour kernel values, never an ``N × N`` mask.
    The masked kernels are not symmetric (``j ∈ N(i)`` does not imply ``i ∈ N(j)``), so the unbiased
    value changes slightly when A and B are swapped (its ``1ᵀK̃L̃1`` term); the biased one does not.
    platonic-rep's default ``topk=None`` raises there; here ``k`` defaults to 10 and must be ≥ 2.
    CKNNA is not bounded by 1, biased or unbiased: the masked kernels are not positive
    semi-definite (with duplicated rows values ≈ 1.05 occur); such a value comes with an
    :class:`AlignmentWarning`.
    Features that do not vary across samples raise ``ValueError``, as for every metric.

    Args:
        A: ``(N, D_a)`` features of the N samples (a tensor or array; any device).
        B: ``(N, D_b)`` features of the same samples, in the same order, on the same device.
        k: neighbours per sample (2 ≤ k ≤ N − 1 when unbiased, ≤ N otherwise).
        unbiased: Song et al.'s unbiased HSIC with self excluded (needs N ≥ 4); False: biased.
        normalize: L2-normalise rows first (cosine geometry).
        clip_quantile: clip outliers with :func:`clip_outliers` at this quantile first; None: off.

    Returns:
        CKNNA, ≈ [0, 1] (not a bound: see above).

    Raises:
        TypeError: features that are not a real (N, D) tensor or array, or complex.
        ValueError: features not 2-D, empty, with NaN/Inf, with different N or devices, or constant
            across samples, ``k`` < 2 or out of range, N < 4 when unbiased; ``clip_quantile``
            outside (0, 1].

    Warns:
        AlignmentWarning: a value outside [−1, 1] (the masked kernels are not PSD).

    Example:
        >>> import torch
        >>> from neurothermo import alignment
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(200, 16)
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16))  # a random rotation
        >>> noisy = A @ Q + 0.5 * torch.randn(200, 16)
        >>> 0.0 < alignment.cknna(A, noisy, k=10) < 1.0
        True
    """
    return pairwise(Cknna(k, unbiased=unbiased, normalize=normalize, clip_quantile=clip_quantile), A, B)


register("mutual_knn", mutual_knn, MutualKnn)
register("cycle_knn", cycle_knn, CycleKnn)
register("cknna", cknna, Cknna)
