"""entropic_loss / functional_entropic_loss against dense float64 references and docs/theory.md §1 (a)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import (
    DT,
    dense_grad_hessian,
    dist,
    flat,
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


@pytest.mark.parametrize(("n_steps", "wd"), [(None, 0.0), (3, 0.0), (None, 0.1), (1, 0.2)])
def test_value_and_gradient_match_dense_reference(n_steps: int | None, wd: float) -> None:
    model = tiny_regressor()
    x, y = regression_data(6, seed=1)
    lr = 0.3
    phi = nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=lr, weight_decay=wd, n_steps=n_steps)
    grad_phi = torch.autograd.grad(phi, list(model.parameters()))
    g, h = dense_grad_hessian(objective(model, nn.MSELoss(), x, y, wd), params_of(model))
    frac = 1.0 if n_steps is None else 1 - 1 / n_steps
    f0 = objective(model, nn.MSELoss(), x, y, wd)(params_of(model))
    torch.testing.assert_close(phi.detach(), f0 + lr / 4 * frac * g @ g)
    # ∇F_n = g + (lr/2)(1 − 1/n)·H g: the factor 2 of the entropic gradient
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in grad_phi]),
                               g + lr / 2 * frac * h @ g)


def test_preconditioner_gives_g_lambda_g() -> None:
    model = tiny_regressor()
    x, y = regression_data(6, seed=1)
    gen = torch.Generator().manual_seed(5)
    lam = {k: 0.5 + torch.rand(p.shape, generator=gen, dtype=DT) for k, p in model.named_parameters()}
    lr = 0.2
    phi = nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=lr, preconditioner=lam)
    grad_phi = torch.cat([t.reshape(-1) for t in torch.autograd.grad(phi, list(model.parameters()))])
    g, h = dense_grad_hessian(objective(model, nn.MSELoss(), x, y), params_of(model))
    lam_flat = flat(lam)
    torch.testing.assert_close(grad_phi, g + lr / 2 * h @ (lam_flat * g))
    # Λ = I given explicitly is the same as no preconditioner
    ones = {k: torch.ones((), dtype=DT) for k in lam}
    torch.testing.assert_close(
        nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=lr, preconditioner=ones),
        nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=lr))


def test_functional_core_on_a_2d_toy_loss() -> None:
    def banana(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 - t[0]) ** 2 + (t[1] - t[0] ** 2) ** 2

    theta = torch.tensor([-0.8, 1.4], dtype=DT, requires_grad=True)
    lr, n = 0.1, 2
    out = nt.functional_entropic_loss(banana, theta, lr=lr, n_steps=n)
    g = torch.func.grad(banana)(theta.detach())
    h = torch.autograd.functional.hessian(banana, theta.detach())
    torch.testing.assert_close(out.detach(), banana(theta.detach()) + lr / 4 * 0.5 * g @ g)
    (grad_out,) = torch.autograd.grad(out, theta)  # gradients reach the caller's tensor
    torch.testing.assert_close(grad_out, g + lr / 2 * 0.5 * h @ g)
    # a tensor that does not require grad gives the same value (a leaf copy is used)
    torch.testing.assert_close(
        nt.functional_entropic_loss(banana, theta.detach(), lr=lr, n_steps=n).detach(), out.detach())
    # a sequence of tensors is passed to f in the same structure
    seq = nt.functional_entropic_loss(lambda ps: banana(torch.stack(ps)),
                                      [theta[0].detach(), theta[1].detach()], lr=lr, n_steps=n)
    torch.testing.assert_close(seq.detach(), out.detach())


@pytest.mark.parametrize("n", [2, 4])
def test_n_small_steps_on_F_n_match_one_big_step_to_third_order(n: int) -> None:
    """docs/theory.md §1 check (a): n steps of η/n on F_n vs one step of η on l: error ∝ η³; on l: η²."""
    model = tiny_regressor()
    x, y = regression_data(8, seed=1)
    f = objective(model, nn.MSELoss(), x, y)
    p0 = params_of(model)
    plain, corrected = [], []
    for lr in LRS:
        big = gd(f, p0, lr, 1)
        plain.append(dist(gd(f, p0, lr / n, n), big))
        F = lambda p, lr=lr: nt.functional_entropic_loss(f, p, lr=lr, n_steps=n)  # noqa: E731
        corrected.append(dist(gd(F, p0, lr / n, n), big))
    tol = slope_tolerance(top_curvature(f, p0), max(LRS))
    assert abs(loglog_slope(LRS, plain) - 2) < tol
    assert abs(loglog_slope(LRS, corrected) - 3) < tol
    assert corrected[-1] < 0.05 * plain[-1]


def test_n_steps_one_is_the_plain_loss_and_n_to_infinity_is_phi() -> None:
    model = tiny_regressor()
    x, y = regression_data(5, seed=1)
    plain = nn.MSELoss()(model(x), y)
    torch.testing.assert_close(nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=0.5, n_steps=1), plain)
    phi = nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=0.5)
    f_big = nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=0.5, n_steps=10**6)
    torch.testing.assert_close(f_big, phi, rtol=1e-5, atol=0)


def test_training_on_the_entropic_loss_fills_grad() -> None:
    model = tiny_regressor()
    x, y = regression_data(5, seed=1)
    phi = nt.entropic_loss(model, nn.MSELoss(), (x, y), lr=0.1)
    assert all(p.grad is None for p in model.parameters())
    phi.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
