"""EntropicRegularizer: its gradient is exactly (lr/2)·H·g (docs/theory.md §1 check (e), on a quadratic
with a known Hessian; a factor-2 slip here is common in public code)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import (
    DT,
    dense_grad_hessian,
    objective,
    params_of,
    regression_data,
    tiny_regressor,
)


@pytest.mark.parametrize("wd", [0.0, 0.2])
def test_gradient_is_lr_over_two_h_g_on_a_quadratic_with_known_hessian(wd: float) -> None:
    """Least squares l = (1/b)Σ(wᵀx_i − y_i)²: H = (2/b)XᵀX + wd·I, g = H_l w − (2/b)Xᵀy + wd·w."""
    x, y = regression_data(8, seed=1)
    y = y[:, :1]
    model = nn.Linear(3, 1, bias=False).to(DT)
    lr, b = 0.3, 8
    w = model.weight.detach().reshape(-1)
    h = 2 / b * x.T @ x + wd * torch.eye(3, dtype=DT)
    g = 2 / b * x.T @ (x @ w - y[:, 0]) + wd * w
    reg = nt.EntropicRegularizer(lr, weight_decay=wd)
    term = reg(model, nn.MSELoss(), (x, y))
    assert float(term.detach()) == pytest.approx(lr / 4 * float(g @ g), rel=1e-12)
    (grad,) = torch.autograd.grad(term, model.weight)
    torch.testing.assert_close(grad.reshape(-1), lr / 2 * h @ g)
    # and the entropic loss has gradient g + (lr/2)·H·g on the same quadratic
    phi = nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=lr, weight_decay=wd)
    (grad_phi,) = torch.autograd.grad(phi, model.weight)
    torch.testing.assert_close(grad_phi.reshape(-1), g + lr / 2 * h @ g)


def test_micro_batches_average_their_squared_gradients() -> None:
    model = tiny_regressor()
    x, y = regression_data(6, seed=1)
    lr = 0.2
    term = nt.EntropicRegularizer(lr, batch_size=2)(model, nn.MSELoss(), (x, y))
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(term, list(model.parameters()))])
    ref_value, ref_grad = 0.0, torch.zeros_like(grad)
    for i in range(0, 6, 2):
        g, h = dense_grad_hessian(objective(model, nn.MSELoss(), x[i:i + 2], y[i:i + 2]),
                                  params_of(model))
        ref_value += lr / 4 * float(g @ g) / 3
        ref_grad += lr / 2 * h @ g / 3
    assert float(term.detach()) == pytest.approx(ref_value, rel=1e-12)
    torch.testing.assert_close(grad, ref_grad)


def test_bad_settings_raise() -> None:
    model = tiny_regressor()
    x, y = regression_data(5, seed=1)
    with pytest.raises(ValueError, match="multiple"):
        nt.EntropicRegularizer(0.1, batch_size=2)(model, nn.MSELoss(), (x, y))
    with pytest.raises(ValueError, match="lr"):
        nt.EntropicRegularizer(0.0)
    with pytest.raises(ValueError, match="batch_size"):
        nt.EntropicRegularizer(0.1, batch_size=0)
