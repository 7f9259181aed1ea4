"""Noether charges: references, exact SGD steps, gradient-flow conservation, isometric trajectories."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from neurothermo.symmetry import Symmetry, find_symmetries
from neurothermo.symmetry.rotation import random_orthogonal

D = torch.float64


class Mixed(nn.Module):
    """Attention (query–key and value–output pairs) then an MLP mixing every kind:
    fc1 → relu → fc2 (rescale, permutation), fc2 → fc3 (double rotation), fc3 → LayerNorm(eps=0)
    (whole scale), ln → fc4 (rescale of the LayerNorm affine), fc4 → tanh → fc5 (sign flip)."""

    def __init__(self, d: int = 6, heads: int = 2, hidden: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, hidden), nn.Linear(hidden, 4), nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4, eps=0.0)
        self.fc4, self.fc5 = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        b, t, d = x.shape

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        h = self.o((att @ v).transpose(1, 2).reshape(b, t, d)).mean(1)
        z = self.fc3(self.fc2(F.relu(self.fc1(h))))
        return self.fc5(torch.tanh(self.fc4(self.ln(z))))


class ConvBN(nn.Module):
    """Conv → BatchNorm (train mode, eps 1e-13) → ReLU → Conv → ReLU → flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, eps=1e-13), nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 2)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).flatten(1))


def _weightnormed() -> nn.Module:
    return nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 2))


MODELS = {
    "mixed": (Mixed, (16, 3, 6)),
    "conv_bn": (ConvBN, (8, 2, 6, 6)),
    "weight_norm": (_weightnormed, (16, 4)),
}


def _setup(name: str, seed: int = 0):
    torch.manual_seed(seed)
    make, shape = MODELS[name]
    model = make().to(D)
    x = torch.randn(*shape, dtype=D)
    y = torch.randn(shape[0], 2, dtype=D)
    syms = [s for s in find_symmetries(model, x) if s.has_charge]
    return model, x, y, syms


def test_mixed_model_has_every_charged_kind():
    _, _, _, syms = _setup("mixed")
    # o → mean over time → fc1 is a double rotation too (the mean is linear over positions)
    assert sorted(s.kind for s in syms) == ["double_rotation"] * 4 + ["rescale"] * 2 + ["scale"]


def _size(model: nn.Module, sym: Symmetry) -> float:
    """Unsigned magnitude Σ‖θ‖² of the tensors a symmetry acts on (scale of rounding errors)."""
    return sum(float(model.get_parameter(n).detach().pow(2).sum()) for n in sym.param_names)


@pytest.mark.parametrize("name", list(MODELS))
def test_charge_is_half_the_norm_derivative_along_the_generator(name):
    """Independent reference: J·M = ½ d/dλ Σ‖θ(λ)‖² along g(λ) = exp(λM), by central differences
    through ``transform`` (which only uses the group action, not the charge formula)."""
    model, _, _, syms = _setup(name)
    gen = torch.Generator().manual_seed(3)
    eps = 1e-4  # truncation O(eps²)·S ≈ 1e-8·S, rounding 1e-16·S/eps ≈ 1e-12·S
    for sym in syms:
        shape = sym.charge_shape
        direction = torch.randn(shape if shape else (1,), generator=gen, dtype=D)
        if sym.kind == "double_rotation":
            def element(lam, m=direction):
                return torch.linalg.matrix_exp(lam * m)
        else:
            def element(lam, m=direction, shape=shape):
                return torch.exp(lam * m).reshape(shape)

        def norm2(lam, sym=sym, element=element):
            trial = copy.deepcopy(model)
            sym.transform(trial, element(lam))
            return sum(float(trial.get_parameter(n).detach().pow(2).sum()) for n in sym.param_names)

        derivative = (norm2(eps) - norm2(-eps)) / (2 * eps)
        contraction = float((sym.charge(model) * direction.reshape(shape)).sum())
        assert abs(contraction - derivative / 2) <= 1e-7 * _size(model, sym), str(sym)


def test_charge_direct_formulas():
    model, _, _, syms = _setup("mixed")
    by = {(s.kind, s.location.split()[0]): s for s in syms}
    w = {n: p.detach() for n, p in model.named_parameters()}
    rescale = w["fc1.weight"].pow(2).sum(1) + w["fc1.bias"] ** 2 - w["fc2.weight"].pow(2).sum(0)
    torch.testing.assert_close(by["rescale", "fc1"].charge(model), rescale, rtol=1e-13, atol=1e-14)
    w2 = torch.cat([w["fc2.weight"], w["fc2.bias"][:, None]], 1)
    rot = w2 @ w2.T - w["fc3.weight"].T @ w["fc3.weight"]
    torch.testing.assert_close(by["double_rotation", "fc2"].charge(model), rot, rtol=1e-13, atol=1e-14)
    scale = w["fc3.weight"].pow(2).sum() + w["fc3.bias"].pow(2).sum()
    torch.testing.assert_close(by["scale", "fc3"].charge(model), scale, rtol=1e-13, atol=1e-14)
    ln = w["ln.weight"] ** 2 + w["ln.bias"] ** 2 - w["fc4.weight"].pow(2).sum(0)
    torch.testing.assert_close(by["rescale", "ln"].charge(model), ln, rtol=1e-13, atol=1e-14)


def test_imbalance_direct_formula():
    model, x, y, syms = _setup("mixed")
    F.mse_loss(model(x), y).backward()
    g = {n: p.grad for n, p in model.named_parameters()}
    sym = next(s for s in syms if s.location.startswith("fc1") and s.kind == "rescale")
    ref = g["fc1.weight"].pow(2).sum(1) + g["fc1.bias"] ** 2 - g["fc2.weight"].pow(2).sum(0)
    torch.testing.assert_close(sym.imbalance(g), ref, rtol=1e-13, atol=1e-16)


def _sgd_check(name: str, wd: float) -> None:
    model, x, y, syms = _setup(name)
    lr = 0.2
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        idx = torch.randperm(x.shape[0], generator=gen)[: x.shape[0] // 2]
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        before = [s.charge(model) for s in syms]
        predicted = [s.predict_charge(j, grads, lr, wd) for s, j in zip(syms, before)]
        kick = [lr**2 * s.imbalance(grads) for s in syms]
        opt.step()
        for s, pred, k in zip(syms, predicted, kick):
            size = _size(model, s)
            err = float((s.charge(model) - pred).abs().max())
            # float64 rounding of O(size) sums (~1e-16 each) and BatchNorm's eps = 1e-13, whose
            # relative violation of scale invariance is O(eps/σ²): far below 1e-12·size.
            assert err <= 1e-12 * size, f"{s}: {err:.1e}"
            # the lr² term is ≥ 100× that bound: without it the prediction would fail
            assert float(k.abs().max()) > 1e-10 * size, str(s)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sgd_changes_charge_exactly_as_predicted(name, wd):
    _sgd_check(name, wd)


def test_gradient_flow_conserves_charge_to_integrator_order():
    """RK4 on the full-batch gradient flow. RK4's global error is O(h⁴), so the charge drift must
    fall by ≈ 2⁴ = 16 when h halves (we require ≥ 10, leaving room for the O(h⁵) term), while a
    quantity that is not conserved (Σ‖θ‖²) changes by O(1). The ReLU units are kept active
    (bias + 3) so that the flow is smooth: a kink crossing would lower the integrator's order."""
    model, x, y, syms = _setup("mixed")
    with torch.no_grad():
        model.fc1.bias += 3.0
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def field(vals):
        with torch.no_grad():
            for p, v in zip(params, vals):
                p.copy_(v)
        return torch.autograd.grad(F.mse_loss(model(x), y), params)

    def rk4(vals, h, steps):
        for _ in range(steps):
            k1 = field(vals)
            k2 = field([v - h / 2 * k for v, k in zip(vals, k1)])
            k3 = field([v - h / 2 * k for v, k in zip(vals, k2)])
            k4 = field([v - h * k for v, k in zip(vals, k3)])
            vals = [v - h / 6 * (a + 2 * b + 2 * c + d) for v, a, b, c, d in zip(vals, k1, k2, k3, k4)]
        return vals

    theta0 = [p.detach().clone() for p in params]
    start = dict(zip(names, theta0))
    with torch.no_grad():
        pre = model.fc1(model.o(torch.zeros(1, 6, dtype=D)))
    assert float(pre.min()) > 1.0  # all ReLU units active with margin
    t_end = 0.5
    drift = {}
    for steps in (16, 32):
        end = dict(zip(names, rk4(theta0, t_end / steps, steps)))
        drift[steps] = [float((s.charge(end) - s.charge(start)).abs().max()) for s in syms]
        moved = sum(float(end[n].pow(2).sum() - start[n].pow(2).sum()) for n in names)
    assert abs(moved) > 1e-2
    for s, coarse, fine in zip(syms, drift[16], drift[32]):
        floor = 1e-13 * _size(model, s)  # rounding level: order no longer visible
        assert coarse < 1e-3 * abs(moved), str(s)  # conserved, unlike Σ‖θ‖²
        assert fine <= max(coarse / 10, floor), f"{s}: drift {coarse:.1e} → {fine:.1e}"


def _train(model, x, y, steps, seed):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=gen)[:4]
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


@torch.no_grad()
def _max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).norm() / q.norm()) for p, q in zip(a.parameters(), b.parameters()))


def test_isometries_map_sgd_trajectories_onto_each_other():
    """SGD (momentum, weight decay) from a permuted / sign-flipped / rotated model, with the same
    batches, is the permuted / flipped / rotated trajectory (isometries are never broken)."""
    torch.manual_seed(0)
    model, x, y, _ = _setup("mixed")
    syms = find_symmetries(model, x)
    gen = torch.Generator().manual_seed(2)
    cases = [(s, s.random_element(gen)) for s in syms if s.kind in ("permutation", "sign_flip")]
    cases += [(s, random_orthogonal(s, gen, D)) for s in syms if s.kind == "double_rotation"]
    assert len(cases) == 8  # 3 permutations, 1 sign flip, 4 orthogonal double rotations
    for sym, g in cases:
        trained = _train(copy.deepcopy(model), x, y, 8, seed=7)
        expected = sym.transform(copy.deepcopy(trained), g)
        from_moved = _train(sym.transform(copy.deepcopy(model), g), x, y, 8, seed=7)
        assert _max_rel_diff(from_moved, expected) <= 1e-12, str(sym)
    # A non-isometric element (GL, not orthogonal) does not commute with SGD.
    rot = next(s for s in syms if s.kind == "double_rotation")
    g = rot.random_element(gen)
    trained = _train(copy.deepcopy(model), x, y, 8, seed=7)
    moved = _train(rot.transform(copy.deepcopy(model), g), x, y, 8, seed=7)
    assert _max_rel_diff(moved, rot.transform(trained, g)) > 1e-4


def test_bad_inputs():
    model, x, y, syms = _setup("mixed")
    sym = syms[0]
    F.mse_loss(model(x), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    j = sym.charge(model)
    with pytest.raises(ValueError, match="lr"):
        sym.predict_charge(j, grads, lr=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        sym.predict_charge(j, grads, lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="shape"):
        sym.predict_charge(j.flatten()[:1], grads, lr=0.1)
    with pytest.raises(ValueError, match="backward"):
        sym.imbalance(dict.fromkeys(grads))
    with pytest.raises(KeyError, match="missing"):
        sym.imbalance({})
    with pytest.raises(TypeError, match="mapping"):
        sym.imbalance(list(grads.values()))  # type: ignore[arg-type]
    perm = next(s for s in find_symmetries(model, x) if s.kind == "permutation")
    with pytest.raises(ValueError, match="isometr"):
        perm.charge(model)
    with pytest.raises(ValueError, match="not a permutation"):
        perm.transform(model, torch.zeros(perm.n_units, dtype=torch.long))
    by = {s.kind: s for s in syms}
    with pytest.raises(ValueError, match="> 0"):
        by["rescale"].transform(model, -torch.ones(by["rescale"].n_units, dtype=D))
    with pytest.raises(ValueError, match="shape"):
        by["rescale"].transform(model, torch.ones(99, dtype=D))
    with pytest.raises(ValueError, match="singular"):
        by["double_rotation"].transform(model, torch.zeros(by["double_rotation"].charge_shape, dtype=D))
    sign = next(s for s in find_symmetries(model, x) if s.kind == "sign_flip")
    with pytest.raises(ValueError, match="-1"):
        sign.transform(model, torch.full((sign.n_units,), 2.0, dtype=D))
