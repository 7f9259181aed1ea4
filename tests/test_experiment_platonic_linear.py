from __future__ import annotations

import itertools

import pytest
import torch

from neurothermo.alignment import kernel_distance, platonic_kernel
from neurothermo.experiments._linear_nets import (
    balanced_kernel,
    noise_weighted_covariance,
    window_scale,
)
from neurothermo.experiments.platonic_linear import (
    hidden,
    init_chains,
    population_loss,
    sgd_grads,
    well_conditioned,
)
from neurothermo.runner import ExperimentFailed, run_experiment


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Ws = init_chains((3, 5, 4, 3), 2, 1.0, g)
    return g, Ws, well_conditioned(3, g), well_conditioned(3, g)


def test_manual_backprop_matches_autograd() -> None:
    g, Ws, m_in, m_out = _setup()
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    grads = sgd_grads(Ws, m_in, m_out, x, y)
    leaves = [W.clone().requires_grad_(True) for W in Ws]
    z = x @ m_in.T
    for W in leaves:
        z = z @ W.transpose(1, 2)
    loss = 0.5 * ((z @ m_out.T - y) ** 2).sum() / 7  # (1/(2b)) Σ ‖f − y‖², summed over chains
    ref = torch.autograd.grad(loss, leaves)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_population_loss_is_the_expected_sample_loss() -> None:
    g, Ws, m_in, m_out = _setup(1)
    sx = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    v = torch.randn(3, 3, generator=g, dtype=torch.float64)
    n = 400_000
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) @ sx.sqrt()
    z = x @ m_in.T
    P_rows = []
    for c in range(2):
        zc = z
        for W in Ws:
            zc = zc @ W[c].T
        P_rows.append(0.5 * ((zc @ m_out.T - x @ v.T) ** 2).sum(1).mean())
    sample = float(sum(P_rows))
    exact = float(population_loss(Ws, m_in, m_out, v, sx))
    # relative sampling error of a mean of squared Gaussians ≈ √(2/n) ≈ 2e-3; allow 5 s.e.
    assert sample == pytest.approx(exact, rel=5 * (2 / n) ** 0.5)


def test_hidden_layers_exclude_the_last_map() -> None:
    _, Ws, m_in, _ = _setup()
    hs = hidden(Ws, m_in, torch.ones(4, 3, dtype=torch.float64))
    assert [h.shape for h in hs] == [(2, 4, 5), (2, 4, 4)]


def test_balanced_kernel_matches_a_balanced_factorisation() -> None:
    # W_k = U_k S^{1/D} U_{k-1}ᵀ is balanced; the Gram kernel of h_k must be M_inᵀ(PᵀP)^{k/D}M_in.
    g = torch.Generator().manual_seed(3)
    d, D = 3, 3
    us = [torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0] for _ in range(D + 1)]
    s = torch.tensor([2.0, 1.0, 0.3], dtype=torch.float64)
    Ws = [(us[k + 1] * s.pow(1 / D)) @ us[k].T for k in range(D)]
    assert all(torch.allclose(a @ a.T, b.T @ b) for a, b in itertools.pairwise(Ws))
    m_in = well_conditioned(d, g)
    P = Ws[2] @ Ws[1] @ Ws[0]
    A = m_in
    for k in range(1, D):
        A = Ws[k - 1] @ A
        torch.testing.assert_close(balanced_kernel(m_in, P, k, D), A.T @ A, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="hidden layer 1 … 2"):
        balanced_kernel(m_in, P, 3, D)


def test_noise_weighted_covariance_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(4)
    sx = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]], dtype=torch.float64)
    a = torch.tensor([0.6, -0.8, 0.0], dtype=torch.float64)
    n = 400_000
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sx).T
    s = window_scale(x @ a / (a @ sx @ a).sqrt(), 0.3)
    mc = (x * s[:, None]).T @ x / n
    assert float(s.mean()) == pytest.approx(1.0, abs=5 * float(s.std()) / n**0.5)  # E s = 1, 5 s.e.
    exact = noise_weighted_covariance(sx, a, 0.3)
    # entrywise s.e. of a mean of s·x_i·x_j: std/√n; 5 s.e. (deterministic seed)
    se = (x[:, :, None] * x[:, None, :] * s[:, None, None]).std(0) / n**0.5
    assert bool(((mc - exact).abs() <= 5 * se).all()), (mc, exact)


def test_transform_kernel_is_kstar_iff_t_is_a_scaled_rotation() -> None:
    g = torch.Generator().manual_seed(5)
    sx, se = torch.tensor([2.0, 1.0, 0.5]), torch.diag(torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    V = torch.randn(3, 3, generator=g, dtype=torch.float64)
    K = platonic_kernel(sx, V, se)
    q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    x = torch.randn(300, 3, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(K)
    for T, same in ((2.5 * q, True), (q @ torch.diag(torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)), False)):
        K_T = platonic_kernel(sx, T @ V, T @ se @ T.T)
        dist = kernel_distance(x @ L, x, K_T)
        assert (dist < 1e-7) == same, dist


def test_quick_run_every_condition_and_its_control(tmp_path) -> None:
    res = run_experiment("platonic-linear", quick=True, out=tmp_path)
    assert res.summary["all_passed"], [p for p in res.summary["predictions"] if not p["passed"]]
    table = res.summary["figures"]["conditions"]
    by = {r["condition"]: r for r in table}
    assert set(by) == {"reference", "no label noise", "weight decay", "label transform",
                       "input-dependent noise", "GD", "untrained"}
    # "aligned with K*" holds exactly where the theory says so, and fails under every breaking condition
    for cond, row in by.items():
        assert row["measured_aligned_with_kstar"] == row["predicted_aligned_with_kstar"], (cond, row)
        if row["median_distance_to_predicted"] is not None:  # it moves to the kernel predicted instead
            assert row["measured_aligned_with_predicted"], (cond, row)
    # SGD at a tiny learning rate is gradient flow in effect: no entropic force, no K*.
    slow = run_experiment("platonic-linear", quick=True, out=tmp_path,
                          overrides=["steps=500", "lr_start=1e-4", "lr_end=1e-4", "gd_steps=10"])
    verdict = {p["name"]: p["passed"] for p in slow.summary["predictions"]}
    assert not verdict["reference: aligned with K* (median distance ≤ τ)"]
    assert not verdict["weight decay: aligned with M_inᵀ(PᵀP)^{k/D}M_in per layer (median distance ≤ τ)"]
    # Without label noise the theory has no unique kernel: a clear error, not a number.
    with pytest.raises(ExperimentFailed, match="sigma_eps must be positive definite"):
        run_experiment("platonic-linear", quick=True, out=tmp_path,
                       overrides=["steps=10", "sigma_eps=0,0,0"])


def test_switching_each_cause_off_restores_k_star(tmp_path) -> None:
    # No weight decay, an orthogonal transform (T = rotation), a flat noise window (s ≈ 1): each
    # "broken" block becomes the reference, so its "not aligned with K*" verdict must now fail.
    res = run_experiment("platonic-linear", quick=True, out=tmp_path,
                         overrides=["weight_decay=0", "transform=1,1,1", "noise_width=1000"])
    verdict = {p["name"]: p["passed"] for p in res.summary["predictions"]}
    for cond in ("weight decay", "label transform", "input-dependent noise"):
        assert not verdict[f"{cond}: not aligned with K* (median distance ≥ τ)"], cond
    assert verdict["reference: aligned with K* (median distance ≤ τ)"]


def test_bad_settings_are_refused() -> None:
    from neurothermo.config import ConfigError

    with pytest.raises(ConfigError, match="widths_a must start and end with the data dimension 3"):
        run_experiment("platonic-linear", quick=True, overrides=["widths_a=3,4"])
