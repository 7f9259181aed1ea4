from __future__ import annotations

import pytest
import torch
from torch import nn

from neurothermo.experiments.sharpness_phase import (
    equilibrium_weights,
    lambda_star,
    population_sharpness,
    sgd_step,
)
from neurothermo.runner import run_experiment


def test_sgd_step_matches_autograd_on_mse_loss() -> None:
    g = torch.Generator().manual_seed(0)
    W1 = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    W2 = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    lr = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    new1, new2 = sgd_step(W1, W2, x, y, lr)
    for c in range(3):
        net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)).double()
        with torch.no_grad():
            net[0].weight.copy_(W1[c])
            net[1].weight.copy_(W2[c])
        loss = nn.MSELoss()(net(x[c]), y[c])
        g1, g2 = torch.autograd.grad(loss, [net[0].weight, net[1].weight])
        torch.testing.assert_close(new1[c], W1[c] - lr[c] * g1, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(new2[c], W2[c] - lr[c] * g2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.9])
def test_lambda_star_is_the_dense_hessian_eigenvalue(p: float) -> None:
    W1, W2 = equilibrium_weights(p)
    # the equilibrium is a minimum: W₂W₁ = I
    torch.testing.assert_close(W2 @ W1, torch.eye(2, dtype=torch.float64))
    assert float(population_sharpness(W1[None], W2[None])[0]) == pytest.approx(lambda_star(p), rel=1e-12)


def test_lambda_star_limits() -> None:
    # p → 0: λ* → 2K/√(2p) (THEORY.md §4); balanced p = 1: λ* = 4K
    assert lambda_star(1e-8) * (2 * 1e-8) ** 0.5 == pytest.approx(2 * 0.5, rel=1e-3)
    assert lambda_star(1.0) == pytest.approx(4 * 0.5)


def test_quick_run_and_divergence_is_not_a_pass(tmp_path) -> None:
    res = run_experiment("sharpness-phase", quick=True, out=tmp_path,
                         overrides=["lrs=0.3,0.7", "ps=0.1,0.4", "steps=1500", "chains=2",
                                    "check_samples=4000"])
    assert res.summary["all_passed"], res.summary["predictions"]
    assert (res.path / "sharpness_phase.png").exists()
    bad = run_experiment("sharpness-phase", quick=True, out=tmp_path,
                         overrides=["lrs=0.99", "ps=0.4", "steps=600", "batch_size=1",
                                    "chains=4", "check_samples=200"])
    assert bad.summary["figures"]["diverged_chains"] > 0
    assert not bad.summary["all_passed"]
