"""Gradient flow on the entropic loss: closed forms on quadratics, integrator orders, and docs/theory.md
§1 checks (b) (flow vs one GD step) and (c) (matrix learning rate)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import (
    DT,
    dist,
    gd,
    loglog_slope,
    objective,
    params_of,
    regression_data,
    slope_tolerance,
    tiny_regressor,
    top_curvature,
)

LRS = [0.05, 0.025, 0.0125, 0.00625]
A = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=DT)
THETA0 = torch.tensor([1.0, -0.5, 2.0], dtype=DT)


def quad(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * t @ A @ t


def test_entropic_flow_of_a_quadratic_is_the_closed_form() -> None:
    """φ = ½θᵀAθ + (η/4)θᵀA²θ, so θ(t) = exp(−t(A + (η/2)A²))θ₀ (with Λ: exp(−tΛ(A + (η/2)AΛA)))."""
    # RK4's global error is ≈ T·λ⁵h⁴/120 relative, λ the largest rate (< 7 here); with T = 1.5 and
    # h = T/100 that is ≈ 1e-8, so rtol = 1e-7.
    lr, t, steps, rtol, atol = 0.3, 1.5, 100, 1e-7, 1e-12
    end = nt.functional_flow(quad, THETA0, time=t, steps=steps, lr=lr)
    torch.testing.assert_close(end, torch.linalg.matrix_exp(-t * (A + lr / 2 * A @ A)) @ THETA0,
                               rtol=rtol, atol=atol)
    plain = nt.functional_flow(quad, THETA0, time=t, steps=steps)
    torch.testing.assert_close(plain, torch.linalg.matrix_exp(-t * A) @ THETA0,
                               rtol=rtol, atol=atol)
    lam = torch.tensor([0.5, 2.0, 1.0], dtype=DT)
    pre = nt.functional_flow(quad, THETA0, time=t, steps=steps, lr=lr, preconditioner=lam)
    L = torch.diag(lam)
    torch.testing.assert_close(
        pre, torch.linalg.matrix_exp(-t * L @ (A + lr / 2 * A @ L @ A)) @ THETA0,
        rtol=rtol, atol=atol)


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_integrators_converge_at_their_order(method: str, order: int) -> None:
    exact = torch.linalg.matrix_exp(-1.0 * A) @ THETA0
    steps = [8, 16, 32]
    errs = [float(torch.linalg.norm(nt.functional_flow(quad, THETA0, time=1.0, steps=s,
                                                       method=method) - exact)) for s in steps]
    # error C·h^p(1 + O(h·‖A‖)); h ≤ 1/8 and ‖A‖ ≈ 2.3 bound the bias of the slope by ≈ 0.3
    assert abs(-loglog_slope(steps, errs) - order) < 0.3


@pytest.mark.parametrize("preconditioned", [False, True])
def test_flow_for_time_lr_matches_one_step_to_third_order(preconditioned: bool) -> None:
    """Checks (b) and (c): the time-η flow of φ_η (θ̇ = −Λ∇φ) vs one step θ − ηΛg: error ∝ η³;
    the flow of the plain loss: ∝ η²."""
    model = tiny_regressor()
    x, y = regression_data(8, seed=1)
    f = objective(model, nn.MSELoss(), x, y)
    p0 = params_of(model)
    lam = None
    factor = 1.0
    if preconditioned:
        gen = torch.Generator().manual_seed(3)
        lam = {k: 0.5 + 1.5 * torch.rand(v.shape, generator=gen, dtype=DT) for k, v in p0.items()}
        factor = max(float(v.max()) for v in lam.values())
    lrs = [lr / factor for lr in LRS]  # the next-order term scales with η·Λ
    plain, corrected = [], []
    for lr in lrs:
        big = gd(f, p0, lr, 1, lam)
        # RK4 with 4 steps: integration error O((η/4)⁵) per unit, far below η³
        corrected.append(dist(nt.functional_flow(f, p0, time=lr, steps=4, lr=lr,
                                                  preconditioner=lam), big))
        plain.append(dist(nt.functional_flow(f, p0, time=lr, steps=4, preconditioner=lam), big))
    tol = slope_tolerance(top_curvature(f, p0), max(lrs), factor)
    assert abs(loglog_slope(lrs, plain) - 2) < tol
    assert abs(loglog_slope(lrs, corrected) - 3) < tol


def test_n_step_construction_with_a_matrix_learning_rate() -> None:
    """Check (c) for F_n: n steps of η/n with Λ on l + (η/4)(1 − 1/n)gᵀΛg vs one step θ − ηΛg."""
    model = tiny_regressor(5)
    x, y = regression_data(8, seed=2)
    f = objective(model, nn.MSELoss(), x, y)
    p0 = params_of(model)
    gen = torch.Generator().manual_seed(4)
    lam = {k: 0.5 + 1.5 * torch.rand(v.shape, generator=gen, dtype=DT) for k, v in p0.items()}
    lrs = [lr / 2 for lr in LRS]  # Λ ≤ 2: the next-order term scales with η·Λ
    n, plain, corrected = 3, [], []
    for lr in lrs:
        big = gd(f, p0, lr, 1, lam)
        plain.append(dist(gd(f, p0, lr / n, n, lam), big))
        F = lambda p, lr=lr: nt.functional_entropic_loss(f, p, lr=lr, n_steps=n,  # noqa: E731
                                                         preconditioner=lam)
        corrected.append(dist(gd(F, p0, lr / n, n, lam), big))
    tol = slope_tolerance(top_curvature(f, p0), max(lrs), 2.0)
    assert abs(loglog_slope(lrs, plain) - 2) < tol
    assert abs(loglog_slope(lrs, corrected) - 3) < tol


def test_model_level_flow_equals_functional_flow_and_leaves_the_model_alone() -> None:
    model = tiny_regressor()
    x, y = regression_data(6, seed=1)
    before = params_of(model)
    end = nt.entropic_flow(model, nn.MSELoss(), (x, y), lr=0.1, time=0.2, steps=3, weight_decay=0.05)
    ref = nt.functional_flow(objective(model, nn.MSELoss(), x, y, 0.05), before, time=0.2, steps=3,
                             lr=0.1)
    assert list(end) == list(before)
    for k in end:
        torch.testing.assert_close(end[k], ref[k])
        assert torch.equal(dict(model.named_parameters())[k].detach(), before[k])
    # n_steps = 1 is plain gradient flow
    plain = nt.entropic_flow(model, nn.MSELoss(), (x, y), lr=0.1, time=0.2, steps=3, n_steps=1)
    ref_plain = nt.functional_flow(objective(model, nn.MSELoss(), x, y), before, time=0.2, steps=3)
    assert dist(plain, ref_plain) < 1e-14
