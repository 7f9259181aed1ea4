from __future__ import annotations

import torch

from neurothermo.experiments.forward_backward import balance_sides
from neurothermo.experiments.platonic_linear import init_chains, sgd_grads, well_conditioned
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
    for k, (A, B, _, _) in enumerate(balance_sides(Ws, m_in, m_out, V, sx, se), start=1):
        for exact, samples in ((A[0], grads[k - 1] @ grads[k - 1].transpose(1, 2)),
                               (B[0], grads[k].transpose(1, 2) @ grads[k])):
            se_mc = samples.std(0) / n**0.5
            assert bool(((samples.mean(0) - exact).abs() <= 5 * se_mc + 1e-12).all())


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    res = run_experiment("forward-backward", quick=True, out=tmp_path,
                         overrides=["steps=12000", "chains=2"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], preds
    assert any(p["control"] for p in preds.values())
    # Full-batch GD conserves the charges: the layers stay unbalanced and the forward/backward
    # covariances unaligned, so both main predictions must fail.
    res = run_experiment("forward-backward", quick=True, out=tmp_path,
                         overrides=["steps=3000", "chains=2", "optimizer=gd"])
    main = [p for p in res.summary["predictions"] if p["name"].startswith("GD:")]
    assert len(main) == 2 and not any(p["passed"] for p in main)
