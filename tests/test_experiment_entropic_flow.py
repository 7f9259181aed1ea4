"""The science of `entropic-flow`, checked independently of the experiment's own predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neurothermo.experiments.entropic_flow import (
    LOSSES,
    corrected_loss,
    gd,
    grad_of,
    loglog_slope,
    step_errors,
)
from neurothermo.runner import run_experiment


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_error_orders_on_both_losses(name: str) -> None:
    f = LOSSES[name]
    theta0 = torch.tensor([-0.8, 1.4], dtype=torch.float64)
    # Halving η: an O(η^p) error e = cη^p(1 + aη + …) shrinks by 2^p(1 + aη/2 + …). With |a| of the
    # order of the curvature along the path (≲ 10) and η = 2e-3 the deviation is ≲ 1%; ±10% of 4 and
    # 8 is ample and still far from the neighbouring orders (2 vs 4 vs 8 vs 16).
    lr = 2e-3
    p1, c1 = step_errors(f, theta0, lr, 2)
    p2, c2 = step_errors(f, theta0, lr / 2, 2)
    assert p1 / p2 == pytest.approx(4.0, rel=0.1)
    assert c1 / c2 == pytest.approx(8.0, rel=0.1)


def test_corrected_loss_matches_finite_differences() -> None:
    """F_n = L + (η/4)(1−1/n)‖∇L‖²: its gradient minus ∇L is (η/2)(1−1/n)H∇L (no factor-2 slip)."""
    f = LOSSES["wells"]
    lr, n = 0.1, 3
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64)
    F = corrected_loss(f, lr, n)
    diff = grad_of(F, theta) - grad_of(f, theta)
    # independent reference: central differences of ∇L along ∇L give H∇L to O(h²)
    g = grad_of(f, theta)
    h = 1e-5
    Hg = (grad_of(f, theta + h * g) - grad_of(f, theta - h * g)) / (2 * h)
    torch.testing.assert_close(diff, lr / 2 * (1 - 1 / n) * Hg, rtol=1e-7, atol=1e-12)


def test_gd_on_quadratic_matches_closed_form() -> None:
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)

    def quad(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * t @ A @ t

    theta0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    path = gd(quad, theta0, 0.1, 3)
    expected = torch.linalg.matrix_power(torch.eye(2, dtype=torch.float64) - 0.1 * A, 3) @ theta0
    torch.testing.assert_close(path[-1], expected, rtol=1e-14, atol=1e-14)


def test_loglog_slope_recovers_power_law() -> None:
    x = np.geomspace(1e-3, 1e-1, 7)
    slope, se = loglog_slope(x, 5.0 * x**2.5)
    assert slope == pytest.approx(2.5, abs=1e-12) and se < 1e-10


def test_quick_run_predictions_hold(tmp_path) -> None:
    res = run_experiment("entropic-flow", quick=True, out=tmp_path,
                         overrides=["figure_steps=2"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert len(preds) == 3 and all(p["passed"] for p in preds.values()), preds
    assert (res.path / "entropic_flow.png").stat().st_size > 10_000
    # a falsifiable control: with n steps on F_n but lr far too large the slope claim must fail
    bad = run_experiment("entropic-flow", quick=True, out=tmp_path,
                         overrides=["lr_min=0.2", "lr_max=0.9", "figure_steps=1"])
    assert not bad.summary["all_passed"]


def test_force_field_on_a_stacked_grid_equals_pointwise_forces() -> None:
    """The figure evaluates −(η/2)(1−1/n)H∇L on all grid points with one HVP of Σ_points L."""
    from neurothermo import functional_entropic_force

    f = LOSSES["banana"]
    pts = torch.tensor([[0.1, 0.2], [-0.5, 1.0], [1.2, -0.3]], dtype=torch.float64)
    stacked = functional_entropic_force(lambda t: f(t).sum(), pts, lr=0.2, n_steps=2)
    for i in range(3):
        t = pts[i].clone().requires_grad_(True)
        g = grad_of(f, t, create_graph=True)
        (hg,) = torch.autograd.grad(g, t, grad_outputs=g.detach())
        torch.testing.assert_close(stacked[i], -0.2 / 2 * (1 - 1 / 2) * hg, rtol=1e-12, atol=1e-14)
