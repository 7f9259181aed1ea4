"""charge_equilibrium: the stationary-charge formula, its error propagation, and a Monte-Carlo check."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.parametrizations import weight_norm

from neurothermo.symmetry import charge_equilibrium, find_symmetries

D = torch.float64


class ScaleNet(nn.Module):
    """``w`` feeds a LayerNorm (eps 0, no affine) over its whole output: ``f(s·w) = f(w)``."""

    def __init__(self, d: int = 6, k: int = 4) -> None:
        super().__init__()
        self.w = nn.Linear(d, k, bias=False)
        self.norm = nn.LayerNorm(k, eps=0.0, elementwise_affine=False)
        self.read = nn.Linear(k, 1).requires_grad_(False)

    def forward(self, x):
        return self.read(self.norm(self.w(x))).squeeze(-1)


def _scale_setup():
    torch.manual_seed(0)
    model = ScaleNet().to(D)
    syms = find_symmetries(model, torch.randn(8, 6, dtype=D))
    assert sorted(s.kind for s in syms) == ["permutation", "scale"]
    sym = next(s for s in syms if s.kind == "scale")
    assert sym.whole and sym.param_names == ("w.weight",)
    return model, sym


def _mlp_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(D)
    x = torch.randn(16, 3, dtype=D)
    sym = next(s for s in find_symmetries(model, x) if s.kind == "rescale")
    return model, x, sym


def test_formula_and_error_propagation():
    _, _, sym = _mlp_setup()
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(50, sym.n_units, generator=gen, dtype=D) + 0.3
    lr, wd = 0.1, 0.01
    eq = charge_equilibrium(sym, samples, lr, wd)
    factor = lr / (wd * (2 - lr * wd))
    torch.testing.assert_close(eq.mean_imbalance, samples.mean(0))
    torch.testing.assert_close(eq.charge, factor * samples.mean(0))
    torch.testing.assert_close(eq.charge_stderr, factor * samples.std(0) / math.sqrt(50))
    assert eq.samples == 50 and eq.kind == "rescale"
    single = charge_equilibrium(sym, samples[0], lr, wd)
    assert single.samples == 1 and single.charge_stderr is None and single.imbalance_stderr is None


def test_gradient_mappings_are_reduced_with_imbalance():
    model, x, sym = _mlp_setup()
    grads = []
    for i in range(4):
        model.zero_grad()
        F.mse_loss(model(x[4 * i: 4 * i + 4]), torch.zeros(4, 2, dtype=D)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    eq = charge_equilibrium(sym, grads, lr=0.1, weight_decay=0.1)
    ref = torch.stack([sym.imbalance(g) for g in grads]).mean(0)
    torch.testing.assert_close(eq.mean_imbalance, ref)
    one = charge_equilibrium(sym, grads[0], lr=0.1, weight_decay=0.1)
    torch.testing.assert_close(one.mean_imbalance, sym.imbalance(grads[0]))


def test_without_weight_decay_the_prediction_is_balance():
    _, _, sym = _mlp_setup()
    eq = charge_equilibrium(sym, torch.zeros(sym.n_units, dtype=D), lr=0.1)
    assert eq.charge is None and "balance" in eq.note
    _, scale = _scale_setup()
    eq = charge_equilibrium(scale, torch.tensor([[1.0], [2.0]], dtype=D).squeeze(1), lr=0.1)
    assert eq.charge is None and "no equilibrium" in eq.note


def test_bad_inputs():
    model, x, sym = _mlp_setup()
    perm = next(s for s in find_symmetries(model, x) if s.kind == "permutation")
    ok = torch.zeros(sym.n_units, dtype=D)
    with pytest.raises(ValueError, match="isometry"):
        charge_equilibrium(perm, ok, 0.1, 0.1)
    with pytest.raises(ValueError, match=">= 2"):
        charge_equilibrium(sym, ok, lr=1.0, weight_decay=2.0)
    with pytest.raises(ValueError, match="lr"):
        charge_equilibrium(sym, ok, lr=-0.1)
    with pytest.raises(ValueError, match="shape"):
        charge_equilibrium(sym, torch.zeros(3, 7, dtype=D), 0.1, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        charge_equilibrium(sym, torch.full((sym.n_units,), float("nan"), dtype=D), 0.1, 0.1)
    with pytest.raises(TypeError, match="grad_stats"):
        charge_equilibrium(sym, [], 0.1, 0.1)
    with pytest.raises(TypeError, match="Symmetry"):
        charge_equilibrium("rescale", ok, 0.1, 0.1)  # type: ignore[arg-type]


class Direction(nn.Module):
    """``f(x) = g·vᵀx/‖v‖`` with ``g`` frozen: weight normalisation makes ``v`` scale-free."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = weight_norm(nn.Linear(3, 1, bias=False))
        self.lin.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x):
        return self.lin(x).squeeze(-1)


def test_long_sgd_run_reaches_the_predicted_norm():
    """Scale symmetry with weight decay: E‖v‖² = lr·E‖g_B‖²/(wd·(2 − lr·wd)).

    After a burn-in of ~35 relaxation times (the charge relaxes by (1 − lr·wd)² = 0.64 per step,
    time constant ≈ 3 steps) we record J_t = ‖v_t‖² and the mean of ‖g‖² over 16 *independent*
    minibatches at v_t (the same conditional mean as the step's own gradient, so this is not the
    telescoping identity of the update). At stationarity z_t = J_t − factor·‖g‖²_t has mean zero;
    its standard error comes from batch means over 20 blocks of 50 steps (≫ the correlation time),
    and we require |mean z| ≤ 4 standard errors (Student t with 19 dof: p < 1e-3).
    """
    torch.manual_seed(0)
    model = Direction().to(D)
    (sym,) = [s for s in find_symmetries(model, torch.randn(8, 3, dtype=D)) if s.kind == "scale"]
    (name,) = sym.param_names
    lr, wd, b, k = 0.2, 1.0, 8, 16
    opt = torch.optim.SGD([model.get_parameter(name)], lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.tensor([2.0, -1.0, 0.5], dtype=D)

    def batch(*shape):
        x = torch.randn(*shape, 3, generator=gen, dtype=D)
        return x, x @ teacher + 0.5 * torch.randn(*shape, generator=gen, dtype=D)

    def loss(v, x, y):
        return F.mse_loss(functional_call(model, {name: v}, (x,)), y)

    independent = vmap(grad(loss), in_dims=(None, 0, 0))
    burn, blocks, block = 100, 20, 50
    charges, kicks = [], []
    for t in range(burn + blocks * block):
        if t >= burn:
            charges.append(sym.charge(model))
            g = independent(model.get_parameter(name).detach(), *batch(k, b))
            kicks.append(g.pow(2).sum((1, 2)).mean(0, keepdim=True))  # gᵀAg = ‖g‖² for a scale
        opt.zero_grad()
        x, y = batch(b)
        F.mse_loss(model(x), y).backward()
        opt.step()
    j, kick = torch.stack(charges)[:, 0], torch.stack(kicks)[:, 0]
    eq = charge_equilibrium(sym, kick.unsqueeze(1), lr, wd)
    factor = lr / (wd * (2 - lr * wd))
    means = (j - factor * kick).reshape(blocks, block).mean(1)
    stderr = float(means.std() / math.sqrt(blocks))
    measured = float(j.mean())
    assert stderr < 0.1 * measured  # the check has power: a factor-2 error would be ≫ 4 SE
    assert abs(measured - float(eq.charge[0])) <= 4 * stderr
