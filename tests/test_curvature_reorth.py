"""Partial reorthogonalisation in Lanczos: as accurate as full reorthogonalisation, no more products.

The operators are built to lose orthogonality fast: a diagonal (or rotated) spectrum with one
dominant eigenvalue that converges in a few steps and a cluster below it that takes many more
(Paige: once a Ritz value converges, plain Lanczos vectors regain components along its vector and
ghost copies of it appear). Every check compares against the exact spectrum (``eigvalsh`` of the
float64 matrix) and against the same solver with full reorthogonalisation; a control with the
reorthogonalisation switched off must fail the same checks.
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch import Tensor

from neurothermo.curvature import DenseOperator, lanczos
from neurothermo.curvature.gram_schmidt import DOT_CHUNK, column_dots
from neurothermo.curvature.lanczos import band_lanczos, orthogonality_level
from neurothermo.curvature.operator import column_block

lanczos_module = sys.modules["neurothermo.curvature.lanczos"]  # the package re-exports the function


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rotated(ev: Tensor, seed: int = 0) -> Tensor:
    n = ev.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen(seed)))
    return Q @ torch.diag(ev) @ Q.T


def clustered(n: int = 400) -> Tensor:
    """λ1 = 100 (converges in a few steps), then 10, 9.99, 9.98, 9.97, then [0, 9.5]."""
    top = torch.tensor([100.0, 10.0, 9.99, 9.98, 9.97], dtype=torch.float64)
    return torch.cat([top, torch.linspace(0, 9.5, n - 5, dtype=torch.float64)])


CASES = [  # (k, block, max_basis): no restart, restarts, blocks
    (1, 1, 120), (4, 1, 120), (4, 1, 16), (3, 3, 30), (4, 2, 24)]


@pytest.mark.parametrize(("k", "p", "m"), CASES)
def test_partial_matches_full_and_the_exact_spectrum(k: int, p: int, m: int) -> None:
    ev = clustered()
    A = torch.diag(ev)  # diagonal: the eigenvectors are the unit vectors
    top = torch.sort(ev, descending=True)
    stats: dict[str, int] = {}
    res = {}
    for mode in ("partial", "full"):
        res[mode] = band_lanczos(DenseOperator(A), k, tol=1e-10, block_size=p, max_basis=m,
                                 max_matvec=4000, generator=gen(1), reorth=mode,
                                 stats=stats if mode == "partial" else None)
        assert res[mode].converged
    part, full = res["partial"], res["full"]
    # eigenvalues: error estimate ≤ tol·|λ| (1e-10 relative), each exactly once (no ghost of 100)
    torch.testing.assert_close(part.values, top.values[:k], rtol=1e-9, atol=0)
    # eigenvectors: unit vectors up to sign, and orthonormal
    Y = part.vectors
    align = Y[top.indices[:k], torch.arange(k)].abs()
    # sin∠ ≤ r/gap with gap ≥ 0.01 (the cluster spacing) and r ≤ the reported residual
    assert bool((1 - align <= (part.residuals / 0.01) ** 2 + 1e-12).all()), align
    torch.testing.assert_close(Y.T @ Y, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    # the residuals reported (from the projected matrix) are the true ones, up to what a basis
    # orthogonal to δ = ε^¾ (not exactly) changes in ‖Hy − θy‖: ≈ ‖A‖·δ (= 1.8e-10 here)
    true_resid = torch.linalg.vector_norm(A @ Y - Y * part.values, dim=0)
    atol = float(ev.abs().max()) * orthogonality_level(torch.float64)
    torch.testing.assert_close(part.residuals, true_resid, rtol=1e-6, atol=atol)
    # not more products than full reorthogonalisation (Krylov spaces agree to the level kept)
    assert part.n_matvec <= full.n_matvec + max(2, full.n_matvec // 50), (part.n_matvec, full.n_matvec)
    # and the point of it: most products skip the pass over the whole basis
    assert stats["full_passes"] < part.n_matvec // 2, (stats, part.n_matvec)


def test_orthogonality_is_lost_and_restored_in_float32() -> None:
    # float32, a long run: orthogonality would be lost within ~30 steps (ε = 1.2e-7); the estimates
    # must trigger full passes (stats) and the answer must still be right to float32 accuracy.
    ev = clustered(300)
    A = rotated(ev, seed=3).float()
    stats: dict[str, int] = {}
    res = band_lanczos(DenseOperator(A), 4, tol=1e-5, block_size=1, max_basis=150, max_matvec=3000,
                       generator=gen(2), stats=stats)
    assert res.converged
    assert stats["full_passes"] > 0  # the ω-recurrence saw the loss coming
    exact = torch.linalg.eigvalsh(A.double()).flip(0)[:4]
    # relative accuracy: tol·|λ| plus float32 rounding of the products (‖A‖·ε·√n ≈ 100·1.2e-7·17)
    assert bool(((res.values - exact).abs() <= 1e-5 * exact.abs() + 2e-4).all()), (res.values, exact)
    Y = res.vectors.double()
    # orthonormal to the level kept (m·ε^¾, m ≤ 150) — not just semi-orthogonal
    off = (Y.T @ Y - torch.eye(4, dtype=torch.float64)).abs().max()
    assert float(off) <= 150 * orthogonality_level(torch.float32), off


def test_control_without_reorthogonalisation_gets_ghosts(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same long float64 run with the reorthogonalisation switched off (estimates never trigger):
    # a ghost copy of λ1 = 100 or wrong cluster values must appear, which is what the checks above
    # would catch. Without this the tests above could pass for a method that never reorthogonalises.
    ev = clustered()
    A = torch.diag(ev)
    monkeypatch.setattr(lanczos_module, "orthogonality_level", lambda dtype: float("inf"))
    res = band_lanczos(DenseOperator(A), 4, tol=1e-10, block_size=1, max_basis=120, max_matvec=4000,
                       generator=gen(1))
    exact = torch.sort(ev, descending=True).values[:4]
    bad_values = not torch.allclose(res.values, exact, rtol=1e-9, atol=0)
    Y = res.vectors
    bad_vectors = float((Y.T @ Y - torch.eye(4, dtype=torch.float64)).abs().max()) > 1e-6
    assert bad_values or bad_vectors


def test_public_lanczos_uses_partial_and_counts_the_same_products() -> None:
    ev = clustered(200)
    A = rotated(ev, seed=5)
    a = lanczos(DenseOperator(A), 2, tol=1e-8, generator=gen(4))
    b = band_lanczos(DenseOperator(A), 2, tol=1e-8, generator=gen(4), reorth="partial")
    assert a.n_matvec == b.n_matvec
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reorth"):
        band_lanczos(DenseOperator(A), 1, reorth="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inner_products_by_pieces_match_float64(dtype: torch.dtype) -> None:
    # Lanczos's inner products (coefficients and squared norms, from which it normalises) over
    # more than DOT_CHUNK numbers, a tail included: against the float64 products. Each piece is one
    # float32 sum of L = DOT_CHUNK terms, whose rounding errors add up like a random walk to about
    # √L·ε₃₂ ≈ 3e-5 of the sum (the pieces are then added in float64); float64 input: ~√L·ε₆₄.
    n = 3 * DOT_CHUNK + 1001
    B = column_block(n, 3, dtype, "cpu")
    B.copy_(torch.randn(n, 3, generator=gen(7), dtype=torch.float64))
    got = column_dots(B, B[:, 2])
    ref = B.double().T @ B[:, 2].double()
    assert got.dtype == torch.float64 and got.shape == (3,)
    tol = DOT_CHUNK ** 0.5 * torch.finfo(dtype).eps
    assert float(((got - ref).abs() / ref[2]).max()) < tol
