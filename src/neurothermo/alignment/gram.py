"""Gram-matrix alignment (docs/theory.md §3): how similar are ``K = AAᵀ`` and ``L = BBᵀ``?

The Platonic claim is about raw inner products, ``c·h_A(x₁)ᵀh_A(x₂) = h_B(x₁)ᵀh_B(x₂)``, so
nothing is centred:

* ``method="cosine"``: ``⟨K, L⟩_F / (‖K‖_F ‖L‖_F) = ‖AᵀB‖²_F / (‖AᵀA‖_F ‖BᵀB‖_F)`` ∈ [0, 1]
  (uncentred linear CKA); 1 iff ``L = cK``.
* ``method="pearson_offdiag"``: the Pearson correlation of the ``N(N−1)`` off-diagonal entries
  ``{K_ij}_{i≠j}`` with ``{L_ij}_{i≠j}`` ∈ [−1, 1] — can be negative (the paper's transformer
  figure runs from −0.2 to 0.8). It ignores the diagonal (squared norms), which dominates the
  cosine in high dimension.

Both are computed in feature space from ``AᵀB`` and the row norms ``r_i = ‖a_i‖²``, in float64:
``Σ_{i≠j} K_ij L_ij = ‖AᵀB‖² − Σ r_i s_i``, ``Σ_{i≠j} K_ij = ‖Σ_i a_i‖² − Σ r_i``,
``Σ_{i≠j} K_ij² = ‖AᵀA‖² − Σ r_i²``. Invariant to rotations, isotropic scaling and column
permutations; not to translations (the Gram matrix is uncentred). Symmetric.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo._types import GramMethod
from neurothermo.alignment._common import compress, preprocess
from neurothermo.alignment._spec import pairwise, register


@dataclass(frozen=True)
class _GramStat:
    x: Tensor  # (N, D') float64 features with the same Gram matrix
    r: Tensor  # (N,) squared row norms (diagonal of K)
    s: Tensor  # 0-d: Σ_{i≠j} K_ij
    norm: Tensor  # 0-d: ‖K‖_F (cosine) or the off-diagonal std × N(N−1) (pearson)


class GramAlignment:
    name = "gram_alignment"
    higher_is_more_aligned = True
    symmetric = True

    def __init__(
        self, method: GramMethod = "cosine", *, normalize: bool = False, clip_quantile: float | None = None
    ) -> None:
        if method not in ("cosine", "pearson_offdiag"):
            raise ValueError(f"method must be 'cosine' or 'pearson_offdiag', got {method!r}")
        self.method = method
        self.normalize = bool(normalize)
        self.clip_quantile = clip_quantile

    def prepare(self, x: Tensor, name: str) -> _GramStat:
        n = x.shape[0]
        if self.method == "pearson_offdiag" and n < 3:
            raise ValueError(f"{name} has N={n} samples; the off-diagonal Pearson correlation needs N >= 3")
        x = compress(preprocess(x, normalize=self.normalize, clip_quantile=self.clip_quantile))
        r = x.square().sum(dim=1)
        s = x.sum(dim=0).square().sum() - r.sum()
        gram_sq = (x.T @ x).square().sum()
        if self.method == "cosine":
            norm = torch.sqrt(gram_sq)
            if not bool(norm > 0):
                raise ValueError(f"{name} is all zeros; the Gram cosine is undefined (0/0)")
        else:
            m = n * (n - 1)
            var = (gram_sq - r.square().sum()) / m - (s / m) ** 2  # variance of off-diagonal K_ij
            scale = gram_sq / m
            if not bool(var > 1e-12 * scale) or not bool(scale > 0):
                raise ValueError(
                    f"the off-diagonal Gram entries of {name} are all equal (e.g. constant or "
                    "orthogonal equal-norm features), so their Pearson correlation is undefined"
                )
            norm = torch.sqrt(var)
        return _GramStat(x, r, s, norm)

    def compare(self, sa: _GramStat, sb: _GramStat) -> Tensor:
        cross = (sa.x.T @ sb.x).square().sum()
        if self.method == "cosine":
            return (cross / (sa.norm * sb.norm)).clamp(0.0, 1.0)
        n = sa.x.shape[0]
        m = n * (n - 1)
        cov = (cross - sa.r @ sb.r) / m - (sa.s / m) * (sb.s / m)
        return (cov / (sa.norm * sb.norm)).clamp(-1.0, 1.0)

    def permute(self, stat: _GramStat, perm: Tensor) -> _GramStat:
        return _GramStat(stat.x[perm], stat.r[perm], stat.s, stat.norm)


def gram_alignment(
    A: Tensor, B: Tensor, method: GramMethod = "cosine", *, normalize: bool = False,
    clip_quantile: float | None = None,
) -> float:
    """Alignment of the uncentred Gram matrices ``AAᵀ`` and ``BBᵀ`` (see the module docstring).

    Args:
        A: ``(N, D_a)`` features of the N samples (a tensor or array; any device).
        B: ``(N, D_b)`` features of the same samples, in the same order, on the same device.
        method: ``"cosine"`` (``⟨G_A, G_B⟩_F / (‖G_A‖_F‖G_B‖_F)``, in [0, 1]) or
            ``"pearson_offdiag"`` (the correlation of the off-diagonal entries, in [−1, 1]).
        normalize: L2-normalise rows first (cosine geometry).
        clip_quantile: clip outliers with :func:`clip_outliers` at this quantile first; None: off.

    Returns:
        The alignment of the two Gram matrices.

    Raises:
        TypeError: features that are not a real (N, D) tensor or array, or complex.
        ValueError: features not 2-D, empty, with NaN/Inf, with different N or devices, or constant
            across samples, all-zero features, fewer than 3 samples for ``pearson_offdiag``, an
            unknown ``method``; ``clip_quantile`` outside (0, 1].

    Example:
        >>> import torch
        >>> from neurothermo import alignment
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(200, 16)
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16))  # a random rotation
        >>> round(alignment.gram_alignment(A, 2 * A @ Q), 6)
        1.0
    """
    return pairwise(GramAlignment(method, normalize=normalize, clip_quantile=clip_quantile), A, B)


register("gram_alignment", gram_alignment, GramAlignment)
