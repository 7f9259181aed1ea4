from __future__ import annotations

import numpy as np
import pytest
import torch

from neurothermo.experiments.rescale_equilibrium import (
    RescaleEquilibriumConfig,
    gd_control,
    predicted_u,
    sgd_chains,
)
from neurothermo.runner import run_experiment


def test_prediction_matches_the_papers_number() -> None:
    # docs/theory.md §2: Σ_x = diag(2, 1, .5, .5), v = (.3, −1, 2, 1.5) → |u| ≈ 1.019
    u = predicted_u(np.array([2, 1, 0.5, 0.5]), np.array([0.3, -1, 2, 1.5]))
    assert u == pytest.approx(1.0185, abs=1e-4)


def test_sgd_step_matches_autograd() -> None:
    """One SGD step of the vectorised chains equals torch autograd on ½·mean (u wᵀx − y)²."""
    cfg = RescaleEquilibriumConfig(lr=0.1, steps=1, chains=2, u0=(0.5,), batch_size=3, block=1)
    rng = np.random.default_rng(0)
    _, trace, _ = sgd_chains(cfg, rng)
    rng = np.random.default_rng(0)  # replay the same draws
    sx, v = np.asarray(cfg.sigma_x), np.asarray(cfg.v)
    X = rng.standard_normal((1, 2, 3, 4)) * np.sqrt(sx)
    Y = X @ v + cfg.noise * rng.standard_normal((1, 2, 3))
    for c in range(2):
        u = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        w = torch.tensor(v / 0.5, dtype=torch.float64, requires_grad=True)
        x, y = torch.tensor(X[0, c]), torch.tensor(Y[0, c])
        loss = 0.5 * ((u * (x @ w) - y) ** 2).mean()
        gu, _ = torch.autograd.grad(loss, (u, w))
        assert trace[0, c] == pytest.approx(abs(float((u - 0.1 * gu).detach())), rel=1e-12)


def test_gd_control_conserves_charge_to_its_bound() -> None:
    cfg = RescaleEquilibriumConfig(lr=0.01, gd_steps=20_000)
    final, pred, drift = gd_control(cfg, 2.0)
    assert abs(final - pred) <= drift + 1e-9
    assert abs(final - predicted_u(np.asarray(cfg.sigma_x), np.asarray(cfg.v))) > 0.5


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    res = run_experiment("rescale-equilibrium", quick=True, out=tmp_path,
                         overrides=["steps=30000", "chains=4", "gd_steps=2000"])
    assert res.summary["all_passed"], res.summary["predictions"]
    # Without label noise there is no gradient noise on the minimum manifold: no entropic force,
    # the chains stay where they start and the balance prediction must fail.
    res = run_experiment("rescale-equilibrium", quick=True, out=tmp_path,
                         overrides=["steps=5000", "chains=2", "gd_steps=100", "noise=0"])
    per_start = {p["name"]: p["passed"] for p in res.summary["predictions"]}
    assert not per_start["start |u0| = 0.4 reaches the same point"]
    assert not per_start["start |u0| = 3 reaches the same point"]
