from __future__ import annotations

import torch

from neurothermo.experiments.forward_backward import balance_sides, norm_allowance, population_grads
from neurothermo.experiments.platonic_linear import (
    init_chains,
    population_loss,
    sgd_grads,
    well_conditioned,
)
from neurothermo.runner import run_experiment


def test_closed_form_sides_match_monte_carlo_per_sample_gradients() -> None:
    """A_k = E[g_kg_kᵀ], B_k = E[g_(k+1)ᵀg_(k+1)] (b = 1) against per-sample autograd-free gradients."""
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    sx, se = torch.tensor([2.0, 1.0, 0.5], dtype=dt), torch.tensor([1.0, 0.5, 0.25], dtype=dt)
    V = torch.randn(3, 3, generator=g, dtype=dt)
    m_in, m_out = well_conditioned(3, g), well_conditioned(3, g)
    Ws = init_chains((3, 4, 4, 3), 1, 1.0, g)          # away from any minimum: E ≠ 0 terms count
    n = 60_000
    x = torch.randn(n, 1, 3, generator=g, dtype=dt) * sx.sqrt()
    y = x @ V.T + torch.randn(n, 1, 3, generator=g, dtype=dt) * se.sqrt()
    grads = sgd_grads([W.expand(n, -1, -1) for W in Ws], m_in, m_out, x, y)
    # hidden activations h_k and backward gradients δ_k per sample, for the factorised sides
    hs = [x @ m_in.T]
    for W in Ws:
        hs.append(hs[-1] @ W[0].T)
    for k, (A, B, _, _, X, Y) in enumerate(balance_sides(Ws, m_in, m_out, V, sx, se), start=1):
        for exact, samples in ((A[0], grads[k - 1] @ grads[k - 1].transpose(1, 2)),
                               (B[0], grads[k].transpose(1, 2) @ grads[k])):
            se_mc = samples.std(0) / n**0.5
            assert bool(((samples.mean(0) - exact).abs() <= 5 * se_mc + 1e-12).all())
        # X_k = E‖h_(k−1)‖²·E[δ_kδ_kᵀ], δ_k = g_k h_(k−1)/‖h_(k−1)‖² (g_k = δ_k h_(k−1)ᵀ, b = 1)
        h_prev = hs[k - 1][:, 0]
        sq = (h_prev**2).sum(1)
        delta = (grads[k - 1] @ h_prev[:, :, None])[:, :, 0] / sq[:, None]
        dd = delta[:, :, None] * delta[:, None, :]
        mc = sq.mean() * dd.mean(0)
        torch.testing.assert_close(X[0], mc, rtol=0.05, atol=0.05 * float(X[0].abs().max()))
        # Y_k = E‖δ_(k+1)‖²·E[h_kh_kᵀ]
        h = hs[k][:, 0]
        d_next = (grads[k] @ h[:, :, None])[:, :, 0] / (h**2).sum(1)[:, None]
        mc = (d_next**2).sum(1).mean() * (h[:, :, None] * h[:, None, :]).mean(0)
        torch.testing.assert_close(Y[0], mc, rtol=0.05, atol=0.05 * float(Y[0].abs().max()))


def test_population_gradients_match_autograd() -> None:
    g = torch.Generator().manual_seed(1)
    dt = torch.float64
    sx = torch.tensor([2.0, 1.0, 0.5], dtype=dt)
    V = torch.randn(3, 3, generator=g, dtype=dt)
    m_in, m_out = well_conditioned(3, g), well_conditioned(3, g)
    Ws = init_chains((3, 4, 5, 3), 3, 1.0, g)
    leaves = [W.clone().requires_grad_(True) for W in Ws]
    ref = torch.autograd.grad(population_loss(leaves, m_in, m_out, V, torch.diag(sx)), leaves)
    for got, want in zip(population_grads(Ws, m_in, m_out, V, sx), ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_norm_allowance_covers_the_error_of_a_mean_of_normal_blocks() -> None:
    """Block means of known symmetric noise: ‖mean‖ exceeds the allowance at a rate ≲ alpha."""
    g = torch.Generator().manual_seed(2)
    dt = torch.float64
    trials, blocks, d = 4000, 10, 4
    scale = torch.linspace(0.1, 2.0, d * d, dtype=dt).view(d, d)
    noise = torch.randn(trials, blocks, d, d, generator=g, dtype=dt) * scale
    noise = (noise + noise.transpose(-1, -2)) / 2      # symmetric, like A_k − B_k
    mean = noise.mean(1)
    se = noise.std(1) / blocks**0.5
    bound = norm_allowance(se, blocks, comparisons=1, alpha=0.05)
    rate = float((mean.flatten(1).norm(dim=1) > bound).double().mean())
    assert rate <= 0.05
    # and it is not vacuous: half of it is exceeded often
    assert float((mean.flatten(1).norm(dim=1) > bound / 2).double().mean()) > 0.1


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    res = run_experiment("forward-backward", quick=True, out=tmp_path, overrides=["chains=2"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], preds
    assert any(p["control"] for p in preds.values())
    # Full-batch GD conserves the charges: the layers stay unbalanced and the forward/backward
    # covariances unaligned, so all three main predictions must fail under the same derived
    # allowances (GD is deterministic: its block errors vanish, and so does its O(η) term).
    res = run_experiment("forward-backward", quick=True, out=tmp_path,
                         overrides=["steps=3000", "window=2000", "chains=2", "optimizer=gd"])
    main = [p for p in res.summary["predictions"] if p["name"].startswith("GD:")]
    assert len(main) == 3 and not any(p["passed"] for p in main)
    rho_bar = res.summary["figures"]["window"]["rho_bar"]
    assert min(min(r) for r in rho_bar) > 0.5
