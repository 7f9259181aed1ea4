"""find_symmetries through ``clamp``: ``clamp(min=0)`` is a ReLU (positively homogeneous: rescale
and permutation), ``clamp(−c, c)`` a hardtanh (odd: sign flip and permutation), other constant
bounds are merely elementwise (permutation only). Each checked by hand on a transformed copy."""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import neurothermo as nt
from _helpers import rel_change as _rel

D = torch.float64
GEN = torch.Generator().manual_seed(31)
X = torch.randn(9, 5, dtype=D, generator=torch.Generator().manual_seed(1))


class Clamped(nn.Module):
    def __init__(self, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.act, self.fc1, self.fc2 = act, nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _model(act: Callable[[Tensor], Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return Clamped(act).to(D)


def _diag(model: nn.Module, s: Tensor) -> nn.Module:
    """fc1 rows and bias × s, fc2 columns ÷ s, by hand."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.fc1.weight.mul_(s[:, None])
        moved.fc1.bias.mul_(s)
        moved.fc2.weight.div_(s[None, :])
    return moved


def _scales() -> Tensor:
    return torch.exp((torch.rand(8, generator=GEN, dtype=D) * 2 - 1) * torch.log(torch.tensor(10.0, dtype=D)))


def _signs() -> Tensor:
    return torch.where(torch.rand(8, generator=GEN) < 0.5, -1.0, 1.0).to(D)


RELU_LIKE = {
    "method_min": lambda h: h.clamp(min=0),
    "function_min": lambda h: torch.clamp(h, min=0.0),
    "clamp_min": lambda h: h.clamp_min(0),
    "max_zero": lambda h: torch.clamp(h, max=0),
}


@pytest.mark.parametrize("act", RELU_LIKE.values(), ids=RELU_LIKE.keys())
def test_clamp_at_zero_is_positively_homogeneous(act):
    model = _model(act)
    syms = nt.find_symmetries(model, X)
    assert sorted(s.kind for s in syms) == ["permutation", "rescale"], [str(s) for s in syms]
    s = _scales()
    assert _rel(_diag(model, s)(X), model(X)) < 1e-12
    (rescale,) = [x for x in syms if x.kind == "rescale"]
    assert _rel(rescale.transform(copy.deepcopy(model), s)(X), model(X)) < 1e-12
    assert _rel(_diag(model, _signs())(X), model(X)) > 1e-3  # not odd: no sign flip


def test_symmetric_clamp_is_odd():
    model = _model(lambda h: h.clamp(-0.5, 0.5))
    syms = nt.find_symmetries(model, X)
    assert sorted(s.kind for s in syms) == ["permutation", "sign_flip"], [str(s) for s in syms]
    assert _rel(_diag(model, _signs())(X), model(X)) < 1e-12
    assert _rel(_diag(model, _scales())(X), model(X)) > 1e-3


def test_shifted_clamp_is_only_elementwise():
    """``clamp(min=0.3)``: a shift breaks homogeneity, and the rescale does change the output."""
    model = _model(lambda h: torch.clamp(h, min=0.3))
    report = nt.find_symmetries(model, X, explain=True)
    assert [s.kind for s in report] == ["permutation"], str(report)
    assert any(r.kind == "rescale" for r in report.rejected), str(report)
    assert _rel(_diag(model, _scales())(X), model(X)) > 1e-3


def test_clamp_to_a_tensor_bound_is_blocked():
    lo = torch.linspace(-0.2, 0.2, 8, dtype=D)
    model = _model(lambda h: torch.clamp(h, min=lo))
    report = nt.find_symmetries(model, X, explain=True)
    assert not [s for s in report if s.location.startswith("fc1")], str(report)
    assert any("bounds that are tensors" in r.reason for r in report.rejected), str(report)
