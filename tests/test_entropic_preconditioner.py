"""preconditioner_from: Λ read off optimizer state reproduces the optimizer's step; the heavy-ball
approximation is tested as an approximation (docs/theory.md §1, "Other optimizers")."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import (
    DT,
    dist,
    loglog_slope,
    objective,
    params_of,
    regression_data,
    slope_tolerance,
    tiny_regressor,
    top_curvature,
)


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One optimizer step; returns the gradient used and the parameter change."""
    before = params_of(model)
    opt.zero_grad()
    nn.MSELoss()(model(x), y).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return grads, {k: p.detach() - before[k] for k, p in model.named_parameters()}


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.0, 0.9)),
    lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.0, 0.9), amsgrad=True),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, centered=True),
    lambda ps: torch.optim.SGD(ps, lr=0.01),
])
def test_lambda_reproduces_the_step_exactly(make: Callable[..., torch.optim.Optimizer]) -> None:
    """With no first-moment momentum the step is exactly −lr·Λ·g, Λ read after the step."""
    model = tiny_regressor()
    x, y = regression_data(6, seed=1)
    opt = make(model.named_parameters())
    for _ in range(3):
        g, delta = _step(model, opt, x, y)
    pre = nt.preconditioner_from(opt)
    assert pre.exact and pre.correction == 1.0 and pre.lr == 0.01
    for k in g:
        torch.testing.assert_close(delta[k], -0.01 * pre.diag[k] * g[k])


def test_adamw_decoupled_decay_is_outside_lambda_and_beta1_is_flagged() -> None:
    model = tiny_regressor()
    x, y = regression_data(6, seed=1)
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.01, betas=(0.0, 0.9), weight_decay=0.1)
    before = params_of(model)
    for _ in range(2):
        before = params_of(model)
        g, delta = _step(model, opt, x, y)
    pre = nt.preconditioner_from(opt)
    for k in g:  # θ' = θ(1 − lr·wd) − lr·Λ·g
        torch.testing.assert_close(delta[k], -0.01 * pre.diag[k] * g[k] - 0.01 * 0.1 * before[k])
    assert "decoupled" in pre.note and pre.weight_decay == 0.1
    adam = torch.optim.Adam(model.parameters(), lr=0.01)  # β₁ = 0.9: the lag is not modelled
    _step(model, adam, x, y)
    pre = nt.preconditioner_from(adam, model)
    assert not pre.exact and "β₁" in pre.note


def test_parameter_groups_with_different_lrs_fold_into_lambda() -> None:
    model = tiny_regressor()
    x, y = regression_data(6, seed=1)
    groups: list[dict[str, Any]] = [{"params": model[0].parameters(), "lr": 0.02},
                                    {"params": model[2].parameters()}]
    opt = torch.optim.RMSprop(groups, lr=0.01)
    g, delta = _step(model, opt, x, y)
    pre = nt.preconditioner_from(opt, model)
    assert pre.lr == 0.02
    for k in g:
        torch.testing.assert_close(delta[k], -pre.lr * pre.diag[k] * g[k])


def test_heavy_ball_approximation_is_second_order_accurate() -> None:
    """Momentum SGD (β = ½) for time T = Kη vs flow with Λ = 1/(1−β) on l + c(η/4)gᵀΛg,
    c = (1+β)/(1−β) (docs/theory.md, Ghosh et al.): error O(η²); without the correction: O(η).

    The momentum buffer starts at its steady state g₀/(1−β): a zero buffer leaves an O(η) lag
    that no modified equation describes. It is an approximation: the test checks orders, not
    equality. Slope tolerance from the next-order term, which scales with η/(1−β)²·λ.
    """
    beta = 0.5
    model = tiny_regressor()
    x, y = regression_data(8, seed=1)
    f = objective(model, nn.MSELoss(), x, y)
    p0 = params_of(model)
    lrs, t = [0.02, 0.01, 0.005], 0.4
    plain, corrected = [], []
    for lr in lrs:
        hb = tiny_regressor()
        hb.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(hb.named_parameters(), lr=lr, momentum=beta)
        g0 = torch.autograd.grad(nn.MSELoss()(hb(x), y), list(hb.parameters()))
        for p, g in zip(hb.parameters(), g0):
            opt.state[p]["momentum_buffer"] = g / (1 - beta)
        for _ in range(round(t / lr)):
            _step(hb, opt, x, y)
        end = params_of(hb)
        pre = nt.preconditioner_from(opt)
        assert not pre.exact and pre.correction == pytest.approx(3.0)
        assert float(pre.diag["0.weight"]) == pytest.approx(2.0)
        steps = round(t / lr) // 4  # RK4 error ≈ Tλ⁵h⁴/120 with h = 4η: < 1e-3 of the η² error
        corrected.append(dist(nt.functional_flow(f, p0, time=t, steps=steps, lr=lr,
                                                 preconditioner=pre), end))
        plain.append(dist(nt.functional_flow(f, p0, time=t, steps=steps, preconditioner=pre), end))
    tol = slope_tolerance(top_curvature(f, p0), max(lrs), 1 / (1 - beta) ** 2)
    assert abs(loglog_slope(lrs, plain) - 1) < tol
    assert abs(loglog_slope(lrs, corrected) - 2) < tol
    assert corrected[-1] < 0.1 * plain[-1]


def test_bad_optimizers_and_states_raise() -> None:
    model = tiny_regressor()
    with pytest.raises(ValueError, match="take at least one"):
        nt.preconditioner_from(torch.optim.Adam(model.named_parameters()))
    with pytest.raises(ValueError, match="named_parameters"):
        nt.preconditioner_from(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="nesterov"):
        nt.preconditioner_from(torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9,
                                               nesterov=True))
    with pytest.raises(ValueError, match="maximize"):
        nt.preconditioner_from(torch.optim.SGD(model.named_parameters(), lr=0.1, maximize=True))
    with pytest.raises(TypeError, match="supports Adam"):
        nt.preconditioner_from(torch.optim.Adagrad(model.named_parameters()))
    x, y = regression_data(4, seed=1)
    with pytest.raises(ValueError, match="does not broadcast"):
        nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=0.1,
                         preconditioner={k: torch.ones(7, dtype=DT) for k, _ in model.named_parameters()})
    with pytest.raises(ValueError, match="no entry"):
        nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.1, preconditioner={"0.weight": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.1,
                          preconditioner={k: -1.0 for k, _ in model.named_parameters()})
