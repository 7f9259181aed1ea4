from __future__ import annotations

import pytest
import torch

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


def test_quick_run_predictions_and_controls(tmp_path) -> None:
    small = ["widths_b=3,5,5,3", "chains=2", "gd_steps=300", "test_samples=200"]
    res = run_experiment("platonic-linear", quick=True, out=tmp_path,
                         overrides=[*small, "steps=8000"])
    assert res.summary["all_passed"], res.summary["predictions"]
    # SGD at a tiny learning rate is gradient flow in effect: no entropic force, no K*.
    slow = run_experiment("platonic-linear", quick=True, out=tmp_path,
                          overrides=[*small, "steps=500", "lr_start=1e-4", "lr_end=1e-4"])
    first = slow.summary["predictions"][0]
    assert first["name"].startswith("SGD: median distance") and not first["passed"]
    # Without label noise the theory has no unique kernel: a clear error, not a number.
    with pytest.raises(ExperimentFailed, match="sigma_eps must be positive definite"):
        run_experiment("platonic-linear", quick=True, out=tmp_path,
                       overrides=[*small, "steps=10", "sigma_eps=0,0,0"])


def test_bad_settings_are_refused() -> None:
    from neurothermo.config import ConfigError

    with pytest.raises(ConfigError, match="widths_a must start and end with the data dimension 3"):
        run_experiment("platonic-linear", quick=True, overrides=["widths_a=3,4"])
