"""find_symmetries through gated MLPs ``down(act(gate(x)) ⊙ up(x))`` (SwiGLU, ReGLU, GeGLU):
the intermediate units are permuted jointly (gate rows, up rows, down columns), rescaled and
sign-flipped through the linear up branch, and through the gate branch only as far as ``act``
allows. Every reported symmetry is re-checked by hand on a transformed copy with strong group
elements; every control checks that the transform it rules out does change the outputs."""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import neurothermo as nt
from _helpers import rel_change as _rel
from neurothermo.symmetry import Symmetry

D = torch.float64
GEN = torch.Generator().manual_seed(11)


class Gated(nn.Module):
    """``embed → down(act(gate(h)) ⊙ up(h)) → head``; ``up_act`` on the up branch (controls)."""

    def __init__(self, act: Callable[[Tensor], Tensor] = F.silu,
                 up_act: Callable[[Tensor], Tensor] | None = None, d: int = 6, m: int = 10) -> None:
        super().__init__()
        self.act, self.up_act = act, up_act
        self.embed, self.gate, self.up = nn.Linear(5, d), nn.Linear(d, m), nn.Linear(d, m)
        self.down, self.head = nn.Linear(m, d), nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        u = self.up(h) if self.up_act is None else self.up_act(self.up(h))
        return self.head(torch.tanh(self.down(self.act(self.gate(h)) * u)))


class FusedGeGLU(nn.Module):
    """diffusers' GEGLU: one Linear of ``2m`` outputs, ``chunk(2)``, ``value ⊙ gelu(gate)``."""

    def __init__(self, d: int = 6, m: int = 8) -> None:
        super().__init__()
        self.proj, self.down = nn.Linear(d, 2 * m), nn.Linear(m, 3)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))


class GatedPlusStream(Gated):
    """Control: the product is added to another stream before ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        return self.head(self.down(F.silu(self.gate(h)) * self.up(h) + self.side(h)))


class GatedByInput(nn.Module):
    """Control: ``up(x)`` gated by a tensor that is not a layer's units (a second input)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(5, 10), nn.Linear(10, 3)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return self.down(self.up(x) * torch.sigmoid(g))


def _build(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make().to(D)


def _mlp(syms: list[Symmetry]) -> list[tuple[str, str]]:
    """(kind, first token) of the symmetries of the gated units (not the embed/down ones)."""
    return sorted((s.kind, s.location.split()[0]) for s in syms
                  if s.location.split()[0] in ("gate", "up"))


def _one(syms: list[Symmetry], kind: str, first: str) -> Symmetry:
    found = [s for s in syms if s.kind == kind and s.location.split()[0] == first]
    assert len(found) == 1, [str(s) for s in syms]
    return found[0]


def _scales(n: int) -> Tensor:
    """Log-uniform in [0.1, 10]."""
    return torch.exp((torch.rand(n, generator=GEN, dtype=D) * 2 - 1) * torch.log(torch.tensor(10.0, dtype=D)))


def _hand(model: nn.Module, edit: Callable[[nn.Module], None]) -> nn.Module:
    moved = copy.deepcopy(model)
    with torch.no_grad():
        edit(moved)
    return moved


def _rows(lin: nn.Linear, s: Tensor) -> None:
    lin.weight.mul_(s[:, None])
    lin.bias.mul_(s)


X = torch.randn(7, 5, dtype=D, generator=torch.Generator().manual_seed(1))


def test_swiglu_finds_joint_permutation_and_up_rescale_and_sign_flip():
    model = _build(Gated)
    report = nt.find_symmetries(model, X, explain=True)
    assert _mlp(list(report)) == [("permutation", "gate"), ("rescale", "up"), ("sign_flip", "up")], \
        str(report)
    perm = _one(list(report), "permutation", "gate")
    assert perm.n_units == 10
    assert {(s.name, s.role) for s in perm.slices} >= {
        ("gate.weight", "in"), ("gate.bias", "in"), ("up.weight", "in"), ("up.bias", "in"),
        ("down.weight", "out")}
    # SiLU is not homogeneous: the gate rows cannot be rescaled, and the report says so
    assert any(r.kind == "rescale" and r.location.startswith("gate") and "'silu'" in r.reason
               for r in report.rejected), str(report)
    ref = model(X)
    p = torch.randperm(10, generator=GEN)
    s = _scales(10)
    sign = torch.where(torch.rand(10, generator=GEN) < 0.5, -1.0, 1.0).to(D)

    def permute(m: nn.Module) -> None:
        for lin in (m.gate, m.up):
            lin.weight.copy_(lin.weight[p])
            lin.bias.copy_(lin.bias[p])
        m.down.weight.copy_(m.down.weight[:, p])

    def rescale(m: nn.Module) -> None:
        _rows(m.up, s)
        m.down.weight.div_(s[None, :])

    def flip(m: nn.Module) -> None:
        _rows(m.up, sign)
        m.down.weight.mul_(sign[None, :])

    for edit in (permute, rescale, flip):
        assert _rel(_hand(model, edit)(X), ref) < 1e-12, edit.__name__
    # the library's own transform, with the same strong elements, compared here by hand
    for sym, element in ((perm, p), (_one(list(report), "rescale", "up"), s),
                         (_one(list(report), "sign_flip", "up"), sign)):
        moved = sym.transform(copy.deepcopy(model), element)
        assert _rel(moved(X), ref) < 1e-12, str(sym)
        assert _rel(moved.up.weight, model.up.weight) > 1e-3  # it did move something


def test_swiglu_gate_rescale_is_not_a_symmetry():
    """The control of the rejection above: gate rows × s, down columns ÷ s changes the output."""
    model = _build(Gated)

    def gate_rescale(m: nn.Module) -> None:
        s = _scales(10)
        _rows(m.gate, s)
        m.down.weight.div_(s[None, :])

    assert _rel(_hand(model, gate_rescale)(X), model(X)) > 1e-3


def test_reglu_also_rescales_the_gate_rows():
    """ReLU is positively homogeneous: the gate rows rescale as well (and still no sign flip)."""
    model = _build(lambda: Gated(act=F.relu))
    syms = nt.find_symmetries(model, X)
    assert _mlp(syms) == [("permutation", "gate"), ("rescale", "gate"), ("rescale", "up"),
                     ("sign_flip", "up")], [str(x) for x in syms]
    s = _scales(10)

    def gate_rescale(m: nn.Module) -> None:
        _rows(m.gate, s)
        m.down.weight.div_(s[None, :])

    assert _rel(_hand(model, gate_rescale)(X), model(X)) < 1e-12
    moved = _one(syms, "rescale", "gate").transform(copy.deepcopy(model), s)
    assert _rel(moved(X), model(X)) < 1e-12

    def gate_flip(m: nn.Module) -> None:  # ReLU is not odd: the rejected sign flip changes it
        _rows(m.gate, -torch.ones(10, dtype=D))
        m.down.weight.neg_()

    assert _rel(_hand(model, gate_flip)(X), model(X)) > 1e-3


def test_fused_geglu_is_split_into_its_two_halves():
    """One Linear, ``chunk(2)``: rows 0:8 are the value (linear) half, 8:16 the GELU gate."""
    model = _build(FusedGeGLU)
    x = torch.randn(7, 6, dtype=D, generator=torch.Generator().manual_seed(2))
    syms = nt.find_symmetries(model, x)
    found = sorted((s.kind, s.location.split()[0]) for s in syms)
    assert found == [("permutation", "proj[0:8]"), ("rescale", "proj[0:8]"),
                     ("sign_flip", "proj[0:8]")], [str(s) for s in syms]
    p, s = torch.randperm(8, generator=GEN), _scales(8)

    def permute(m: nn.Module) -> None:
        idx = torch.cat([p, p + 8])
        m.proj.weight.copy_(m.proj.weight[idx])
        m.proj.bias.copy_(m.proj.bias[idx])
        m.down.weight.copy_(m.down.weight[:, p])

    def rescale(m: nn.Module) -> None:
        m.proj.weight[:8].mul_(s[:, None])
        m.proj.bias[:8].mul_(s)
        m.down.weight.div_(s[None, :])

    ref = model(x)
    for edit in (permute, rescale):
        assert _rel(_hand(model, edit)(x), ref) < 1e-12, edit.__name__
    for sym, element in ((_one(syms, "permutation", "proj[0:8]"), p),
                         (_one(syms, "rescale", "proj[0:8]"), s)):
        assert _rel(sym.transform(copy.deepcopy(model), element)(x), ref) < 1e-12, str(sym)


def test_both_factors_nonlinear_is_not_a_gated_linear_unit():
    """``silu(gate) ⊙ silu(up)``: no rescale or sign flip of either branch, no joint permutation
    reported (with the reason); rescaling the up rows does change the output."""
    model = _build(lambda: Gated(up_act=F.silu))
    report = nt.find_symmetries(model, X, explain=True)
    assert not [s for s in report if s.location.split()[0] in ("gate", "up")], str(report)
    assert any(r.kind == "permutation" and "both factors" in r.reason for r in report.rejected), \
        str(report)

    def up_rescale(m: nn.Module) -> None:
        s = _scales(10)
        _rows(m.up, s)
        m.down.weight.div_(s[None, :])

    assert _rel(_hand(model, up_rescale)(X), model(X)) > 1e-3


def test_product_added_to_another_stream_is_blocked():
    model = _build(GatedPlusStream)
    report = nt.find_symmetries(model, X, explain=True)
    assert not [s for s in report if s.location.split()[0] in ("gate", "up", "side")], str(report)
    assert any("residual add across the units" in r.reason for r in report.rejected), str(report)
    s = _scales(10)

    def up_rescale(m: nn.Module) -> None:
        _rows(m.up, s)
        m.down.weight.div_(s[None, :])

    def permute(m: nn.Module) -> None:
        p = torch.randperm(10, generator=GEN)
        for lin in (m.gate, m.up):
            lin.weight.copy_(lin.weight[p])
            lin.bias.copy_(lin.bias[p])
        m.down.weight.copy_(m.down.weight[:, p])

    for edit in (up_rescale, permute):
        assert _rel(_hand(model, edit)(X), model(X)) > 1e-3, edit.__name__


def test_gate_that_is_not_a_layer_keeps_only_the_diagonal_symmetries():
    """``up(x) ⊙ σ(g)``, ``g`` an input: scaling or flipping up's units still passes (σ(g) does
    not move), permuting them does not (σ(g) is not permuted with them), and the report says so."""
    model = _build(GatedByInput)
    x = torch.randn(7, 5, dtype=D, generator=torch.Generator().manual_seed(3))
    g = torch.randn(7, 10, dtype=D, generator=torch.Generator().manual_seed(4))
    report = nt.find_symmetries(model, (x, g), explain=True)
    assert sorted(s.kind for s in report) == ["rescale", "sign_flip"], str(report)
    assert any(r.kind == "permutation" and "not another layer's units" in r.reason
               for r in report.rejected), str(report)
    ref = model(x, g)
    for s in report:
        el = s.random_element(GEN, dtype=D)
        assert _rel(s.transform(copy.deepcopy(model), el)(x, g), ref) < 1e-12, str(s)
    p = torch.randperm(10, generator=GEN)

    def permute(m: nn.Module) -> None:
        m.up.weight.copy_(m.up.weight[p])
        m.up.bias.copy_(m.up.bias[p])
        m.down.weight.copy_(m.down.weight[:, p])

    assert _rel(_hand(model, permute)(x, g), ref) > 1e-3


@pytest.mark.parametrize("act", [F.silu, F.gelu, F.relu, torch.tanh])
def test_every_reported_gated_symmetry_holds_on_fresh_inputs(act):
    model = _build(lambda: Gated(act=act))
    fresh = torch.randn(9, 5, dtype=D, generator=torch.Generator().manual_seed(5))
    syms = nt.find_symmetries(model, X)
    assert any(s.kind == "permutation" and s.location.startswith("gate ⊙ up") for s in syms)
    for s in syms:
        assert nt.verify_symmetry(model, s, fresh) < 1e-12, str(s)
