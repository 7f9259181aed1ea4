"""entropic_force = −(lr/2)·H_B Λ g_B against dense float64 Hessians and the entropic loss."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import (
    DT,
    dense_grad_hessian,
    flat,
    objective,
    params_of,
    regression_data,
    tiny_regressor,
)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_force_matches_dense_hessian_product(wd: float) -> None:
    model = tiny_regressor()
    x, y = regression_data(7, seed=1)
    lr = 0.4
    force = nt.entropic_force(model, nn.MSELoss(), (x, y), lr=lr, weight_decay=wd)
    assert list(force) == [n for n, _ in model.named_parameters()]
    g, h = dense_grad_hessian(objective(model, nn.MSELoss(), x, y, wd), params_of(model))
    torch.testing.assert_close(flat(force), -lr / 2 * h @ g)


def test_force_with_preconditioner_and_heavy_ball_factor() -> None:
    model = tiny_regressor()
    x, y = regression_data(7, seed=1)
    gen = torch.Generator().manual_seed(2)
    lam = {k: 0.2 + torch.rand(p.shape, generator=gen, dtype=DT) for k, p in model.named_parameters()}
    g, h = dense_grad_hessian(objective(model, nn.MSELoss(), x, y), params_of(model))
    force = nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.3, preconditioner=lam)
    torch.testing.assert_close(flat(force), -0.15 * h @ (flat(lam) * g))
    pre = nt.Preconditioner(diag=lam, correction=3.0, exact=False)
    force_c = nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.3, preconditioner=pre)
    torch.testing.assert_close(flat(force_c), 3.0 * flat(force))


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_force_is_minus_the_entropic_part_of_the_loss_gradient(wd: float) -> None:
    """−(∇φ − ∇l), with ∇φ from differentiating entropic_loss (an independent path)."""
    model = tiny_regressor(4)
    x, y = regression_data(6, seed=3)
    lr = 0.25
    phi = nt.entropic_loss(model, nn.CrossEntropyLoss(), (x, y.argmax(1)), lr=lr, weight_decay=wd)
    plain = nt.entropic_loss(model, nn.CrossEntropyLoss(), (x, y.argmax(1)), lr=lr,
                             weight_decay=wd, n_steps=1)
    params = list(model.parameters())
    diff = [a - b for a, b in zip(torch.autograd.grad(phi, params), torch.autograd.grad(plain, params))]
    force = nt.entropic_force(model, nn.CrossEntropyLoss(), (x, y.argmax(1)), lr=lr, weight_decay=wd)
    for d, f in zip(diff, force.values()):
        torch.testing.assert_close(f, -d)


def test_force_is_linear_in_lr_and_vanishes_at_a_stationary_point() -> None:
    model = nn.Linear(3, 1, bias=False).to(DT)
    x, _ = regression_data(10, seed=1)
    w_star = torch.tensor([[0.5, -1.0, 2.0]], dtype=DT)
    y = x @ w_star.T  # interpolating least squares: g = 0 at w*
    f1 = nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.1)["weight"]
    f2 = nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.2)["weight"]
    torch.testing.assert_close(f2, 2 * f1)
    with torch.no_grad():
        model.weight.copy_(w_star)
    f0 = nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.1)["weight"]
    torch.testing.assert_close(f0, torch.zeros_like(f0), atol=1e-13, rtol=0)


def test_functional_force_on_a_quadratic() -> None:
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=DT)
    theta = torch.tensor([0.7, -0.2], dtype=DT)
    force = nt.functional_entropic_force(lambda t: 0.5 * t @ a @ t, theta, lr=0.1)
    torch.testing.assert_close(force, -0.05 * a @ (a @ theta))
    # a linear function has H = 0: no entropic force (and no error from the double backward)
    lin = nt.functional_entropic_force(lambda t: t.sum(), theta, lr=0.1)
    torch.testing.assert_close(lin, torch.zeros_like(theta))


def test_n_step_force_is_the_entropic_part_of_the_F_n_gradient() -> None:
    """The lead's 2-D toy: −(∇F_n − ∇f) = −(η/2)(1 − 1/n)·H∇f, from differentiating F_n."""

    def wells(t: torch.Tensor) -> torch.Tensor:
        return torch.log1p((t[0] ** 2 - 1) ** 2) + 0.5 * (t[1] - 0.5 * torch.sin(2 * t[0])) ** 2

    theta = torch.tensor([0.3, -0.7], dtype=DT, requires_grad=True)
    lr, n = 0.2, 3
    (d_f,) = torch.autograd.grad(wells(theta), theta)
    (d_fn,) = torch.autograd.grad(nt.functional_entropic_loss(wells, theta, lr=lr, n_steps=n), theta)
    force = nt.functional_entropic_force(wells, theta, lr=lr, n_steps=n)
    torch.testing.assert_close(force, -(d_fn - d_f))
    torch.testing.assert_close(force, (1 - 1 / n) * nt.functional_entropic_force(wells, theta, lr=lr))
