"""sharpness-phase: closed forms against dense references, the sampler against Wishart moments, the
exact charge identity, and every prediction failing under its control."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neurothermo.experiments import sharpness_model as sm
from neurothermo.experiments.sharpness_figures import cell_edges
from neurothermo.experiments.sharpness_phase import PAPER_LRS, PAPER_PS
from neurothermo.runner import run_experiment

DT = torch.float64


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def test_gradients_match_autograd_on_mse_loss_and_the_moment_form() -> None:
    g = torch.Generator().manual_seed(0)
    W1, W2, x, eps = _rand(g, 3, 2, 2), _rand(g, 3, 2, 2), _rand(g, 3, 5, 2), _rand(g, 3, 5, 2)
    y = x + eps
    k = torch.full((3,), 0.5, dtype=DT)
    g1, g2 = sm.gradients(W1, W2, x, y, k)
    for c in range(3):
        net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)).double()
        with torch.no_grad():
            net[0].weight.copy_(W1[c])
            net[1].weight.copy_(W2[c])
        ref = torch.autograd.grad(nn.MSELoss()(net(x[c]), y[c]), [net[0].weight, net[1].weight])
        torch.testing.assert_close(g1[c], ref[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g2[c], ref[1], rtol=1e-12, atol=1e-14)
    Sxx = x.transpose(1, 2) @ x / 5
    Sex = eps.transpose(1, 2) @ x / 5
    m1, m2 = sm.moment_gradients(W1, W2, Sxx, Sex, k)
    torch.testing.assert_close(m1, g1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m2, g2, rtol=1e-12, atol=1e-14)


def test_population_hessian_is_the_autograd_hessian() -> None:
    g = torch.Generator().manual_seed(1)
    W1, W2 = _rand(g, 4, 2, 2), _rand(g, 4, 2, 2)
    sx = torch.rand(4, 2, generator=g, dtype=DT) + 0.1
    k = torch.rand(4, generator=g, dtype=DT) + 0.2

    def loss(w: torch.Tensor, s: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        E = w[4:].reshape(2, 2) @ w[:4].reshape(2, 2) - torch.eye(2, dtype=DT)
        return kk * (E * E * s).sum()

    w = torch.cat([W1.flatten(1), W2.flatten(1)], 1)
    ref = torch.func.vmap(torch.func.hessian(loss))(w, sx, k)
    torch.testing.assert_close(sm.population_hessian(W1, W2, sx, k), ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("reading", sm.READINGS)
@pytest.mark.parametrize("p", [0.01, 0.1, 0.4, 1.0])
def test_lambda_star_is_the_dense_eigenvalue_at_the_balanced_point(reading: str, p: float) -> None:
    sx0, se0 = sm.covariances(p, reading)
    sx, se = torch.tensor([sx0], dtype=DT), torch.tensor([se0], dtype=DT)
    A = torch.diag_embed(sm.equilibrium_scales(sx, se))
    k = torch.tensor([0.5], dtype=DT)
    assert float(sm.sharpness(A, torch.linalg.inv(A), sx, k)[0]) == pytest.approx(
        sm.lambda_star(p, 0.5, reading), rel=1e-12)
    # the balance condition E[g₁g₁ᵀ] = E[g₂ᵀg₂] holds there (exact drift formula)
    assert float(sm.manifold_drift(A, sx, se, k, 3).abs().max()) < 1e-14
    # the balanced start is never sharper than the equilibrium
    assert sm.lambda_star(p, 0.5, reading) >= float(sm.start_sharpness(sx, k)[0]) - 1e-12


def test_closed_forms_of_the_readings() -> None:
    p = 0.2
    label = 2 * 0.5 * (math.sqrt(2 / (1 + p)) + math.sqrt((1 + p) / (2 * p)))
    assert sm.lambda_star(p) == pytest.approx(label, rel=1e-13)
    # input variances diag(1, p), isotropic noise: a_l⁴ = (1/s_l)(1+p)/2; top pair (k=1, l=1)
    inp = 2 * 0.5 * (math.sqrt((1 + p) / 2) + math.sqrt(2 / (1 + p)))
    assert sm.lambda_star(p, 0.5, "input") == pytest.approx(inp, rel=1e-13)
    assert sm.lambda_star(p, 0.5, "both") == pytest.approx(2.0, rel=1e-13)   # balance = start
    assert sm.lambda_star(p, 1.0) == pytest.approx(2 * label, rel=1e-13)      # linear in K
    assert sm.lambda_star(1e-8) * math.sqrt(2e-8) == pytest.approx(1.0, rel=1e-3)   # 2K/√(2p)


def test_manifold_drift_matches_monte_carlo_of_batch_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    A = torch.tensor([[1.3, 0.4], [-0.2, 0.7]], dtype=DT)
    n, b = 200_000, 3
    sx = torch.tensor([[1.0, 0.3]], dtype=DT).expand(n, 2)
    se = torch.tensor([[1.0, 0.1]], dtype=DT).expand(n, 2)
    k = torch.full((n,), 0.5, dtype=DT)
    Sxx, Sex = sm.sample_moments(b, sx, se, g)
    W1, W2 = A.expand(n, 2, 2), torch.linalg.inv(A).expand(n, 2, 2)
    g1, g2 = sm.moment_gradients(W1, W2, Sxx[0], Sex[0], k)
    d = g1 @ g1.transpose(1, 2) - g2.transpose(1, 2) @ g2
    pred = sm.manifold_drift(A[None], sx[:1], se[:1], 0.5, b)[0]
    se_mc = d.std(0) / math.sqrt(n)
    # 4 standard errors of the Monte Carlo mean, entrywise
    assert ((d.mean(0) - pred).abs() <= 4 * se_mc).all(), (d.mean(0), pred, se_mc)


@pytest.mark.parametrize("b", [2, 16])
def test_sample_moments_have_wishart_moments(b: int) -> None:
    g = torch.Generator().manual_seed(3)
    n = 100_000
    sx = torch.tensor([[2.0, 0.5]], dtype=DT).expand(n, 2)
    se = torch.tensor([[1.0, 0.25]], dtype=DT).expand(n, 2)
    Sxx, Sex = sm.sample_moments(b, sx, se, g)
    S = torch.cat([torch.cat([Sxx[0], Sex[0].transpose(1, 2)], 2),
                   torch.cat([Sex[0], torch.zeros_like(Sxx[0])], 2)], 1)[:, :, :2]
    var = torch.tensor([2.0, 0.5, 1.0, 0.25], dtype=DT)
    # E[S] = Σ; Var S_ij = (Σ_ij² + Σ_ii Σ_jj)/b: 5 s.e. of the Monte Carlo mean / variance
    for i in range(4):
        for j in range(2):
            sij = S[:, i, j]
            mean = var[i] if i == j else 0.0
            v = float(var[i] * var[j] * (2 if i == j else 1)) / b
            assert abs(float(sij.mean()) - mean) <= 5 * math.sqrt(v / n)
            # a sample variance has relative s.e. √((κ − 1)/n); κ ≤ 10 here: 5 s.e. ≈ 0.05
            assert float(sij.var()) == pytest.approx(v, rel=0.05)
    full = sm.sample_moments(0, sx[:2], se[:2], g)
    torch.testing.assert_close(full[0][0], torch.diag_embed(sx[:2]))
    assert float(full[1].abs().max()) == 0.0


def test_charge_identity_holds_to_round_off_and_first_order_misses_it() -> None:
    g = torch.Generator().manual_seed(4)
    C = 32
    W1, W2 = torch.eye(2, dtype=DT) + 0.3 * _rand(g, C, 2, 2), torch.eye(2, dtype=DT) + 0.3 * _rand(g, C, 2, 2)
    lr = torch.linspace(0.05, 0.4, C, dtype=DT)
    k = torch.full((C,), 0.5, dtype=DT)
    sx = torch.tensor([1.0, 1.0], dtype=DT).repeat(C, 1)
    se = torch.tensor([1.0, 0.1], dtype=DT).repeat(C, 1)
    *_, (res, first) = sm.simulate(W1, W2, lr=lr, k=k, sx=sx, se=se, batch=8, steps=200, every=50,
                                   generator=g, track_charge=200)
    assert res <= 1e-12
    assert first > 0.5      # ΔQ = 0 (gradient flow) is wrong by the whole η² term


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_bad_balance_is_an_error_naming_the_setting(p: float, tmp_path) -> None:
    with pytest.raises(ValueError, match="'p'"):
        sm.lambda_star(p)
    with pytest.raises(ValueError, match="'ps'"):
        run_experiment("sharpness-phase", quick=True, out=tmp_path, overrides=[f"ps=0.1,{p}"])


def test_paper_grid_and_cell_edges() -> None:
    assert len(PAPER_LRS) == 16 and PAPER_LRS[0] == 0.3125 and PAPER_LRS[-1] == 0.6875
    assert len(PAPER_PS) == 27 and 0.0069 < PAPER_PS[0] < 0.0071 and 0.38 < PAPER_PS[-1] < 0.40
    e = cell_edges([0.01, 0.02, 0.1], lower=0.0)
    assert e.tolist() == pytest.approx([0.005, 0.015, 0.06, 0.14])
    assert cell_edges([0.001, 0.2], lower=0.0)[0] == 0.0


SMALL = ["lrs=0.3125,0.6875", "ps=0.02,0.3", "steps=8000", "seeds=4", "compare=input",
         "compare_seeds=1", "probe_chains=6", "conv_lrs=0.04,0.06,0.09", "conv_steps=20000",
         "conv_chains=16", "check_samples=2000"]


def _run(tmp_path, *extra: str):
    res = run_experiment("sharpness-phase", quick=True, out=tmp_path, overrides=SMALL + list(extra))
    return {p["name"]: p["passed"] for p in res.summary["predictions"]}, res


def _failed(preds: dict[str, bool], fragment: str) -> bool:
    hits = [ok for name, ok in preds.items() if fragment in name]
    assert hits, (fragment, list(preds))
    return not all(hits)


def test_defaults_pass_and_figures_exist(tmp_path) -> None:
    preds, res = _run(tmp_path)
    assert all(preds.values()), res.summary["predictions"]
    assert (res.path / "sharpness_phase.png").exists() and (res.path / "sharpness_series.png").exists()
    fig = res.summary["figures"]
    assert fig["sharpening_z_from_sharp_start"] < 3     # control: the sharp start does not sharpen
    assert fig["closest_to_paper"].startswith("label")


def test_no_label_noise_removes_sharpening(tmp_path) -> None:
    preds, _ = _run(tmp_path, "label_noise=0")
    assert _failed(preds, "(sharpening)")
    assert _failed(preds, "(flattening)")
    assert _failed(preds, "fitted intercept")


def test_full_batch_removes_sharpening(tmp_path) -> None:
    preds, _ = _run(tmp_path, "batch_size=0")
    assert _failed(preds, "(sharpening)")
    assert _failed(preds, "(flattening)")


def test_balanced_data_removes_sharpening(tmp_path) -> None:
    preds, _ = _run(tmp_path, "ps=0.999,1.0", "probe_ps=0.999,0.999", "conv_p=0.999")
    assert _failed(preds, "(sharpening)")
    assert _failed(preds, "fitted intercept") or _failed(preds, "log-log slope")


def test_divergence_is_marked_and_never_a_pass(tmp_path) -> None:
    preds, res = _run(tmp_path, "lrs=0.99", "ps=0.4", "batch_size=1", "seeds=4")
    fig = res.summary["figures"]
    assert fig["diverged_cells"] > 0
    assert all(v is None for row in fig["eta_lambda"] for v in row)
    assert not all(preds.values())


def test_input_reading_balance_point_is_where_long_sgd_runs_settle() -> None:
    """The derived a_l⁴ = (ε_l/s_l)·TrΣ_x/TrΣ_ε for input variances diag(1, p): long SGD runs at
    η = 0.02 and 0.03 (b = 4), extrapolated linearly to η = 0, reach the charge eigenvalues a_l² − a_l⁻²."""
    p, n, etas = 0.25, 32, (0.02, 0.03)
    sx0, se0 = sm.covariances(p, "input")
    C = n * len(etas)
    sx, se = torch.tensor([sx0] * C, dtype=DT), torch.tensor([se0] * C, dtype=DT)
    lr = torch.tensor(etas, dtype=DT).repeat_interleave(n)
    eye = torch.eye(2, dtype=DT).repeat(C, 1, 1)
    _, Q, *_ = sm.simulate(eye, eye.clone(), lr=lr, k=torch.full((C,), 0.5, dtype=DT), sx=sx, se=se,
                           batch=4, steps=150_000, every=500, generator=torch.Generator().manual_seed(5))
    # eigenvalues: the hidden rotations W₁ → OW₁ leave the loss unchanged and the iterates diffuse along them
    eig = torch.linalg.eigvalsh(Q[Q.shape[0] // 2:]).mean(0).reshape(len(etas), n, 2)
    mean, err = eig.mean(1), eig.std(1) / math.sqrt(n)
    zero = 3 * mean[0] - 2 * mean[1]                   # linear extrapolation from η = 0.02, 0.03
    zero_se = (9 * err[0] ** 2 + 4 * err[1] ** 2).sqrt()
    a2 = sm.equilibrium_scales(sx[:1], se[:1])[0] ** 2
    target = (a2 - 1 / a2).sort().values
    assert ((zero - target).abs() <= 3 * zero_se).all(), (zero, target, zero_se)
    # and not the label-reading formula a_l⁴ ∝ ε_l (which would give 0 here: ε = (1, 1))
    assert (target.abs() > 10 * zero_se).all()
