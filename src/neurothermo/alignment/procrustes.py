"""Procrustes shape distance (Williams et al. 2021, netrep; Ding et al. 2021).

Centre each layer's columns and scale it to unit Frobenius norm: ``Ã = A_c/‖A_c‖_F``. The best
orthogonal alignment ``min_Q ‖Ã − B̃Q‖_F`` (``Q`` a partial isometry when ``D_a ≠ D_b``) has
``⟨Ã, B̃Q*⟩ = ν = ‖ÃᵀB̃‖_*`` (nuclear norm), so

* ``form="angular"`` (netrep's default): ``arccos(ν)`` ∈ [0, π/2], a metric (triangle inequality);
* ``form="euclidean"``: ``min_Q ‖Ã − B̃Q‖_F = √(2 − 2ν)`` ∈ [0, √2].

A distance: 0 for identical inputs and for rotated, isotropically scaled, translated or
column-permuted copies; lower is more aligned. Not invariant to anisotropic scaling. When
``D > N`` features are compressed to ``N`` columns with the same Gram first. Float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.alignment._common import centre, check_not_constant, compress, preprocess
from neurothermo.alignment._spec import pairwise, register


@dataclass(frozen=True)
class _ShapeStat:
    x: Tensor  # (N, D') centred, unit-Frobenius-norm, compressed float64 features


class Procrustes:
    name = "procrustes_distance"
    higher_is_more_aligned = False
    symmetric = True

    def __init__(
        self, *, form: str = "angular", normalize: bool = False, clip_quantile: float | None = None
    ) -> None:
        if form not in ("angular", "euclidean"):
            raise ValueError(f"form must be 'angular' or 'euclidean', got {form!r}")
        self.form = form
        self.normalize = bool(normalize)
        self.clip_quantile = clip_quantile

    def prepare(self, x: Tensor, name: str) -> _ShapeStat:
        if x.shape[0] < 2:
            raise ValueError(f"{name} has N={x.shape[0]} sample; the Procrustes distance needs N >= 2")
        x = preprocess(x, normalize=self.normalize, clip_quantile=self.clip_quantile)
        xc = centre(x)
        check_not_constant(xc, x, name, "the Procrustes distance")
        xc = compress(xc)
        return _ShapeStat(xc / torch.linalg.matrix_norm(xc))

    def compare(self, sa: _ShapeStat, sb: _ShapeStat) -> Tensor:
        nu = torch.linalg.svdvals(sa.x.T @ sb.x).sum().clamp(0.0, 1.0)
        if self.form == "angular":
            return torch.arccos(nu)
        return torch.sqrt((2.0 - 2.0 * nu).clamp_min(0.0))

    def permute(self, stat: _ShapeStat, perm: Tensor) -> _ShapeStat:
        return _ShapeStat(stat.x[perm])


def procrustes_distance(
    A: Tensor, B: Tensor, *, form: str = "angular", normalize: bool = False,
    clip_quantile: float | None = None,
) -> float:
    """Procrustes shape distance between two ``(N, D)`` feature matrices (module docstring).

    Lower is more aligned (``permutation_null`` knows and tests the lower tail).

    Args:
        A: ``(N, D_a)`` features of the N samples (a tensor or array; any device).
        B: ``(N, D_b)`` features of the same samples, in the same order, on the same device.
        form: ``"angular"`` (in [0, π/2]) or ``"euclidean"``.
        normalize: L2-normalise rows first (cosine geometry).
        clip_quantile: clip outliers with :func:`clip_outliers` at this quantile first; None: off.

    Returns:
        The distance (0 for identical shapes).

    Raises:
        TypeError: features that are not a real (N, D) tensor or array, or complex.
        ValueError: features not 2-D, empty, with NaN/Inf, with different N or devices, or constant
            across samples, fewer than 2 samples, an unknown ``form``;
            ``clip_quantile`` outside (0, 1].

    Example:
        >>> import torch
        >>> from neurothermo import alignment
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(200, 16)
        >>> Q, _ = torch.linalg.qr(torch.randn(16, 16))  # a random rotation
        >>> alignment.procrustes_distance(A, 2 * A @ Q + 1.0) < 1e-6  # LOWER = aligned
        True
    """
    return pairwise(Procrustes(form=form, normalize=normalize, clip_quantile=clip_quantile), A, B)


register("procrustes_distance", procrustes_distance, Procrustes)
