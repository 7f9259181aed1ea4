"""platonic_kernel (K* of docs/theory.md §3) and kernel_distance against closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from neurothermo import alignment as al


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(d, dtype=torch.float64)


def test_diagonal_closed_form():
    sx = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    v = torch.diag(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))
    se = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    k = al.platonic_kernel(sx, v, se)
    want = torch.diag(v.diagonal().abs() * se.sqrt() / sx.sqrt())  # |v|·√ε/√σ
    assert torch.allclose(k, want, atol=1e-14)


def test_kernel_solves_its_riccati_equation():
    sx, se = _spd(4, 0), _spd(3, 1)
    v = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = al.platonic_kernel(sx, v, se)
    # K* is the symmetric PSD solution of K Σ_x K = Vᵀ Σ_ε V
    assert torch.allclose(k, k.T)
    assert torch.linalg.eigvalsh(k).min() > -1e-12
    assert torch.allclose(k @ sx @ k, v.T @ se @ v, atol=1e-10)
    # scaling: K*(cΣ_ε) = √c K*, K*(cΣ_x) = K*/√c
    assert torch.allclose(al.platonic_kernel(sx, v, 4 * se), 2 * k, atol=1e-10)
    assert torch.allclose(al.platonic_kernel(4 * sx, v, se), k / 2, atol=1e-10)


def test_platonic_kernel_bad_input():
    sx = torch.eye(3, dtype=torch.float64)
    v = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma_eps must be positive definite.*no unique kernel"):
        al.platonic_kernel(sx, v, torch.zeros(3))
    with pytest.raises(ValueError, match="sigma_x must be positive definite"):
        al.platonic_kernel(torch.tensor([1.0, 0.0, 1.0]), v, torch.ones(3))
    with pytest.raises(ValueError, match="sigma_x must be symmetric"):
        al.platonic_kernel(torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]), v, torch.ones(3))
    with pytest.raises(ValueError, match=r"sigma_eps is 2×2 but must be 3×3"):
        al.platonic_kernel(sx, v, torch.ones(2))
    with pytest.raises(ValueError, match="teacher matrix"):
        al.platonic_kernel(sx, torch.ones(3), torch.ones(3))


def _dense_distance(f, x, k):
    g = f @ f.T
    gs = x @ k @ x.T
    return float(torch.linalg.matrix_norm(g / g.norm() - gs / gs.norm()))


def test_kernel_distance_matches_dense_computation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    f = torch.tanh(x @ torch.randn(3, 7, generator=g, dtype=torch.float64))
    k = _spd(3, 4)
    assert al.kernel_distance(f, x, k) == pytest.approx(_dense_distance(f, x, k), rel=1e-10)


def test_features_realising_the_kernel_have_zero_distance():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    k = al.platonic_kernel(torch.tensor([2.0, 1.0, 0.5]), _spd(3, 6), torch.tensor([1.0, 0.5, 0.25]))
    w, v = torch.linalg.eigh(k)
    root = (v * w.clamp_min(0).sqrt()) @ v.T  # K^{1/2}
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    # h(x) = c·Q·[K^{1/2} x; 0]: any width, rotation and scale has h(x₁)ᵀh(x₂) ∝ x₁ᵀ K x₂
    f = 3.0 * torch.cat([x @ root, torch.zeros(50, 3, dtype=torch.float64)], 1) @ q
    # distance √(2 − 2cos) with cos = 1 − O(1e-16): the square root turns roundoff into ~1e-8
    assert al.kernel_distance(f, x, k) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(50, 6, generator=g, dtype=torch.float64)
    d = al.kernel_distance(other, x, k)
    assert 0.1 < d <= math.sqrt(2) + 1e-12  # PSD kernels: ⟨G, G*⟩ ≥ 0, so at most √2


def test_kernel_distance_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="features has N=9 samples but inputs has N=10"):
        al.kernel_distance(torch.randn(9, 4), x, torch.eye(3))
    with pytest.raises(ValueError, match="K is 2×2 but must be 3×3"):
        al.kernel_distance(torch.randn(10, 4), x, torch.eye(2))
    with pytest.raises(ValueError, match="features are all zero"):
        al.kernel_distance(torch.zeros(10, 4), x, torch.eye(3))
    with pytest.raises(ValueError, match="predicted Gram matrix"):
        al.kernel_distance(torch.randn(10, 4), x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="features contains NaN"):
        al.kernel_distance(torch.full((10, 4), math.nan), x, torch.eye(3))
