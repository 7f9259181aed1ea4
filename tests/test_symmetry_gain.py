"""find_symmetries on per-unit gains traced as arithmetic (Hugging Face's RMSNorm, T5LayerNorm):
``w ⊙ x̂`` with a ``[d]`` parameter ``w`` followed by Linear consumers only rescales (``w × α``,
the consumers' input columns ``÷ α``). Not when the gain's output also reaches the residual
stream or a non-homogeneous nonlinearity first, nor for Gemma's ``(1 + w) ⊙ x̂``. Each case is
checked by hand on a transformed copy (α log-uniform in [0.1, 10])."""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import neurothermo as nt
from _helpers import rel_change as _rel

D = torch.float64
GEN = torch.Generator().manual_seed(21)
X = torch.randn(6, 4, 8, dtype=D, generator=torch.Generator().manual_seed(1))


class HFRMSNorm(nn.Module):
    """Hugging Face's ``LlamaRMSNorm`` as written there (``weight * x̂.to(dtype)``)."""

    def __init__(self, d: int, eps: float = 1e-6, gemma: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.5 + 1.0)
        self.eps, self.gemma = eps, gemma

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float() if dtype != torch.float64 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:  # Gemma: (1 + w) ⊙ x̂
            return h.to(dtype) * (1.0 + self.weight)
        return self.weight * h.to(dtype)


class Block(nn.Module):
    """``x → embed → norm → {q, v} → q ⊙ … `` with the variants the controls need."""

    def __init__(self, gemma: bool = False, residual: bool = False,
                 act: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(8, 8), HFRMSNorm(8, gemma=gemma)
        self.q, self.v, self.head = nn.Linear(8, 8, bias=False), nn.Linear(8, 8), nn.Linear(8, 3)
        self.residual, self.act = residual, act

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.embed(x)))
        if self.act is not None:
            h = self.act(h)
        y = torch.tanh(self.q(h)) + torch.sigmoid(self.v(h))
        if self.residual:
            y = y + h
        return self.head(y)


def _build(make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return make().to(D)


def _scales(n: int) -> Tensor:
    return torch.exp((torch.rand(n, generator=GEN, dtype=D) * 2 - 1) * torch.log(torch.tensor(10.0, dtype=D)))


def _gain_rescale(model: nn.Module, s: Tensor) -> nn.Module:
    """``w × s``, the q and v input columns ``÷ s``, by hand."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.norm.weight.mul_(s)
        moved.q.weight.div_(s[None, :])
        moved.v.weight.div_(s[None, :])
    return moved


def _at_norm(report: nt.SymmetryReport) -> list[str]:
    return [s.kind for s in report if s.location.split()[0] == "norm"]


def test_rmsnorm_gain_rescales_into_its_linear_consumers():
    model = _build(Block)
    report = nt.find_symmetries(model, X, explain=True)
    (sym,) = [s for s in report if s.location.split()[0] == "norm"]
    assert sym.kind == "rescale" and sym.n_units == 8, str(report)
    assert sym.location.startswith("norm → {q, v}")
    assert {(sl.name, sl.role, sl.dim) for sl in sym.slices} == {
        ("norm.weight", "in", 0), ("q.weight", "out", 1), ("v.weight", "out", 1)}
    s = _scales(8)
    ref = model(X)
    assert _rel(_gain_rescale(model, s)(X), ref) < 1e-12
    moved = sym.transform(copy.deepcopy(model), s)
    assert _rel(moved(X), ref) < 1e-12
    assert _rel(moved.norm.weight, model.norm.weight) > 1e-2


@pytest.mark.parametrize(("make", "why"), [
    (lambda: Block(residual=True), "residual add across the units"),
    (lambda: Block(gemma=True), None),
    (lambda: Block(act=F.gelu), "'gelu' is only elementwise"),
    (lambda: Block(act=F.silu), "'silu' is only elementwise"),
], ids=["residual", "gemma", "gelu", "silu"])
def test_gain_rescale_is_not_reported_where_it_does_not_hold(make, why):
    model = _build(make)
    report = nt.find_symmetries(model, X, explain=True)
    assert _at_norm(report) == [], str(report)
    # a permutation passes the hand-written RMS (its mean over the units is order-free): by hand
    moved = [s for s in report if "norm.weight" in s.param_names]
    assert all(s.kind == "permutation" for s in moved), str(report)
    if moved:
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(4))
        m2 = copy.deepcopy(model)
        with torch.no_grad():
            m2.embed.weight.copy_(m2.embed.weight[perm]), m2.embed.bias.copy_(m2.embed.bias[perm])
            m2.norm.weight.copy_(m2.norm.weight[perm])
            m2.q.weight.copy_(m2.q.weight[:, perm]), m2.v.weight.copy_(m2.v.weight[:, perm])
        assert _rel(m2(X), model(X)) < 1e-12
    if why is not None:
        assert any(r.location.startswith("norm") and why in r.reason for r in report.rejected), \
            str(report)
    # the transform it rules out does change the outputs
    assert _rel(_gain_rescale(model, _scales(8))(X), model(X)) > 1e-3


def test_gain_then_relu_still_rescales():
    """ReLU is positively homogeneous: the gain passes it like a LayerNorm affine does."""
    model = _build(lambda: Block(act=F.relu))
    syms = nt.find_symmetries(model, X)
    assert [s.kind for s in syms if s.location.split()[0] == "norm"] == ["rescale"]
    assert _rel(_gain_rescale(model, _scales(8))(X), model(X)) < 1e-12


def test_transformers_rms_norms_are_read_as_gains():
    """The real ``LlamaRMSNorm`` and ``T5LayerNorm`` (float32 inside: a float32 model)."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    for norm_cls in (modeling.LlamaRMSNorm, t5.T5LayerNorm):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), norm_cls(8), nn.Linear(8, 5), nn.Tanh(),
                              nn.Linear(5, 3))
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)
        x = torch.randn(6, 4, 8)
        syms = nt.find_symmetries(model, x)
        (sym,) = [s for s in syms if s.location.split()[0] == "1"]
        assert sym.kind == "rescale" and sym.location.startswith("1 → 2"), norm_cls
        s = _scales(8).float()
        moved = copy.deepcopy(model)
        with torch.no_grad():
            moved[1].weight.mul_(s)
            moved[2].weight.div_(s[None, :])
        assert _rel(moved(x), model(x)) < 1e-5
