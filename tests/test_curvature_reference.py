"""Dense float64 references for the curvature tests (and tests of the references themselves).

``dense_hessian`` differentiates the mean loss twice with ``torch.func.hessian`` on a flat parameter
vector: an independent path from the Hessian-vector products under test.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

LossFn = Callable[[Tensor, Tensor], Tensor]


def flat_params(model: nn.Module, names: list[str] | None = None) -> tuple[list[str], Tensor]:
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    return names, torch.cat([params[n].detach().reshape(-1) for n in names])


def loss_of_flat(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                 names: list[str] | None = None) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``f(flat θ) = loss_fn(model_θ(x), y)`` over the parameters ``names`` (others fixed)."""
    params = dict(model.named_parameters())
    names, theta = flat_params(model, names)
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]

    def f(flat: Tensor) -> Tensor:
        d = {n: c.view(s) for n, c, s in zip(names, flat.split(numels), shapes)}
        return loss_fn(functional_call(model, d, (x,)), y)

    return f, theta


def dense_hessian(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                  names: list[str] | None = None) -> Tensor:
    """Dense Hessian of the mean loss over all of ``(x, y)`` (float64 if the model is)."""
    f, theta = loss_of_flat(model, loss_fn, x, y, names)
    H = hessian(f)(theta).detach()
    # a reference must be trustworthy: torch.func's batching of some kernels (native batch_norm's
    # double backward) returns asymmetric Hessians, so refuse those
    assert torch.allclose(H, H.T, rtol=1e-10, atol=1e-12), "dense reference Hessian is not symmetric"
    return H


def mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 3)).double()


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


def deep_linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 4, bias=False),
                         nn.Linear(4, 2, bias=False)).double()


def classification_data(n: int = 40, shape: tuple[int, ...] = (5,), seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def regression_data(n: int = 30, d: int = 3, o: int = 2, seed: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, o, generator=g, dtype=torch.float64))


# ---- tests of the reference itself ----------------------------------------------------------

def test_dense_hessian_matches_linear_regression_closed_form() -> None:
    # MSELoss (mean over N samples and o outputs): L = (1/(N o)) Σ_i ‖W x_i − y_i‖², so
    # H = (2/(N o)) · I_o ⊗ XᵀX with W flattened row-major (o = 1: the familiar 2XᵀX/N).
    x, y = regression_data(n=30, d=3, o=2)
    model = nn.Linear(3, 2, bias=False).double()
    H = dense_hessian(model, nn.MSELoss(), x, y)
    expected = torch.kron(torch.eye(2, dtype=torch.float64), 2 * x.T @ x / (30 * 2))
    torch.testing.assert_close(H, expected, rtol=1e-12, atol=1e-12)


def test_dense_hessian_is_symmetric_and_matches_autograd_hvp() -> None:
    model = mlp()
    x, y = classification_data()
    H = dense_hessian(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    f, theta = loss_of_flat(model, nn.CrossEntropyLoss(), x, y)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, hv = torch.autograd.functional.hvp(f, theta, v)
    torch.testing.assert_close(H @ v, hv, rtol=1e-10, atol=1e-12)
