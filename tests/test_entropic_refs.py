"""Checks of the float64 entropic references (defined in ``_helpers.py``) against closed forms."""
from __future__ import annotations

import torch
from torch import nn

from _helpers import (
    DT,
    dense_grad_hessian,
    naive_per_sample_hg,
    objective,
    params_of,
    regression_data,
    tiny_regressor,
)

# ---- checks of the references themselves ----

def test_dense_hessian_of_a_quadratic_is_exact() -> None:
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    p = {"w": torch.tensor([0.3, -0.7], dtype=DT)}
    g, h = dense_grad_hessian(lambda q: 0.5 * q["w"] @ a @ q["w"], p)
    torch.testing.assert_close(h, a)
    torch.testing.assert_close(g, a @ p["w"])


def test_naive_per_sample_loop_matches_dense_per_sample_hessians() -> None:
    model = tiny_regressor(3)
    x, y = regression_data(3, seed=1)
    loss_fn = nn.MSELoss()
    sq, hg = naive_per_sample_hg(model, loss_fn, x, y)
    p = params_of(model)
    ref_sq, ref_hg = torch.zeros((), dtype=DT), torch.zeros_like(hg)
    for i in range(3):
        gi, hi = dense_grad_hessian(objective(model, loss_fn, x[i:i + 1], y[i:i + 1]), p)
        ref_sq += gi @ gi / 3
        ref_hg += hi @ gi / 3
    torch.testing.assert_close(sq, ref_sq)
    torch.testing.assert_close(hg, ref_hg)
