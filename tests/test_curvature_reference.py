"""Checks of the dense float64 curvature references (defined in ``_helpers.py``).

``dense_hessian`` differentiates the mean loss twice with ``torch.func.hessian`` on a flat parameter
vector: an independent path from the Hessian-vector products under test.
"""
from __future__ import annotations

import torch
from torch import nn

from _helpers import (
    classification_data,
    dense_hessian,
    loss_of_flat,
    mlp,
    regression_data,
)

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
