"""find_symmetries on a module that runs several times in one forward pass (weights shared across
depth: ALBERT's one ``AlbertLayer``, a hand-written ``L(L(x))``). A symmetry whose units live
inside one call of the module (produced and consumed there) holds for every call, so for the
model: it is reported once. One that crosses the module's boundary (its output units against
the next call's input) is not. Every reported symmetry is re-checked by hand on a float64
deepcopy with fresh inputs and strong group elements; every control checks by hand that the
transform it rules out does change the outputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import neurothermo as nt
from _helpers import rel_change as _rel
from neurothermo.symmetry import Symmetry

D = torch.float64
GEN = torch.Generator().manual_seed(7)


def _alpha(n: int) -> Tensor:
    """Log-uniform in [0.1, 10]."""
    return torch.exp((torch.rand(n, generator=GEN, dtype=D) * 2 - 1) * torch.log(torch.tensor(10.0)))


class MLP(nn.Module):
    def __init__(self, d: int = 5, m: int = 9) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, m), nn.Linear(m, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Twice(nn.Module):
    """``head(L(L(x)))`` with one MLP ``L``."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = MLP(), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.block(x)))


class Loop(nn.Module):
    """Control: ``L(x) = relu(W x + b)`` applied ``k`` times; its output units feed its input."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.lin, self.head = k, nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.k):
            x = torch.relu(self.lin(x))
        return self.head(x)


def _on(syms: list[Symmetry], name: str) -> list[Symmetry]:
    return [s for s in syms if any(sl.name == name for sl in s.slices)]


def test_mlp_applied_twice_keeps_its_hidden_permutation_and_rescale() -> None:
    torch.manual_seed(0)
    model = Twice().to(D)
    x = torch.randn(6, 5, dtype=D)
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    inner = {s.kind: s for s in _on(list(report), "block.fc1.weight")}
    assert set(inner) == {"rescale", "permutation"}, str(report)
    for s in inner.values():
        assert s.n_units == 9 and "2 calls" in s.location
        assert {(sl.name, sl.role) for sl in s.slices if sl.name.startswith("block.")} >= {
            ("block.fc1.weight", "in"), ("block.fc2.weight", "out")}
    # by hand, fresh inputs: hidden units of the shared MLP permuted / rescaled
    fresh = torch.randn(20, 5, dtype=D, generator=GEN)
    ref = model(fresh)
    perm, alpha = torch.randperm(9, generator=GEN), _alpha(9)
    for kind in ("permutation", "rescale"):
        m2 = copy.deepcopy(model)
        b = m2.block
        with torch.no_grad():
            if kind == "permutation":
                b.fc1.weight.copy_(b.fc1.weight[perm]), b.fc1.bias.copy_(b.fc1.bias[perm])
                b.fc2.weight.copy_(b.fc2.weight[:, perm])
            else:
                b.fc1.weight.mul_(alpha[:, None]), b.fc1.bias.mul_(alpha)
                b.fc2.weight.div_(alpha[None, :])
        assert _rel(m2(fresh), ref) < 1e-12, kind
        # the library's own transform agrees with the hand one
        m3 = copy.deepcopy(model)
        inner[kind].transform(m3, inner[kind].random_element(GEN, dtype=D))
        assert _rel(m3(fresh), ref) < 1e-12, kind
    # control: the MLP's output units rescaled against its own input (fc2 rows ↔ fc1 columns)
    a5 = _alpha(5)
    m4 = copy.deepcopy(model)
    with torch.no_grad():
        m4.block.fc2.weight.mul_(a5[:, None]), m4.block.fc2.bias.mul_(a5)
        m4.block.fc1.weight.div_(a5[None, :])
    assert _rel(m4(fresh), ref) > 1e-3
    assert not _on(list(report), "block.fc2.bias"), str(report)  # nothing moves fc2's rows


@pytest.mark.parametrize("k", [2, 3])
def test_control_units_fed_back_into_the_same_module_are_not_reported(k: int) -> None:
    torch.manual_seed(1)
    model = Loop(k).to(D)
    x = torch.randn(6, 5, dtype=D)
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    assert not _on(list(report), "lin.weight"), str(report)
    assert any("lin" in r.location and "tied/shared" in r.reason for r in report.rejected)
    # by hand: L's output units rescaled (rows of W, b) against its next call (columns of W)
    fresh = torch.randn(20, 5, dtype=D, generator=GEN)
    ref, alpha = model(fresh), _alpha(5)
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        m2.lin.weight.mul_(alpha[:, None]).div_(alpha[None, :]), m2.lin.bias.mul_(alpha)
        m2.head.weight.div_(alpha[None, :])
    assert _rel(m2(fresh), ref) > 1e-3


transformers = pytest.importorskip("transformers")


def _albert() -> tuple[nn.Module, dict[str, Tensor]]:
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(
        vocab_size=32, embedding_size=8, hidden_size=16, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        max_position_embeddings=16, num_labels=3)
    model = transformers.AlbertForSequenceClassification(cfg).to(D).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 32, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def test_albert_shared_layer_rotations_and_permutation_by_hand() -> None:
    model, inputs = _albert()
    report = nt.find_symmetries(model, inputs, explain=True, progress=False)
    pre = "albert.encoder.albert_layer_groups.0.albert_layers.0."
    shared = [s for s in report if s.slices[0].name.startswith(pre)]
    got = sorted((s.kind, s.slices[0].name.removeprefix(pre), s.n_units) for s in shared)
    assert got == [("double_rotation", "attention.query.weight", 16),
                   ("double_rotation", "attention.value.weight", 16),
                   ("permutation", "ffn.weight", 32)], str(report)
    assert all("3 calls" in s.location for s in shared)
    # the last LayerNorm → pooler rescale crosses the shared layer's boundary: not reported
    assert not _on(list(report), pre + "full_layer_layer_norm.weight"), str(report)

    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 32, (5, 7), generator=g)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[2, 5:] = 0

    def out(m: nn.Module) -> Tensor:
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits

    ref = out(model)
    heads, d = 4, 4

    def blocks() -> tuple[Tensor, Tensor]:
        mats = torch.eye(d, dtype=D) + torch.randn(heads, d, d, generator=g, dtype=D)
        return torch.block_diag(*mats), torch.block_diag(*[torch.linalg.inv(t).T for t in mats])

    def layer(m: nn.Module) -> nn.Module:
        return m.albert.encoder.albert_layer_groups[0].albert_layers[0]  # type: ignore[index]

    m1 = copy.deepcopy(model)
    a = layer(m1).attention
    mq, mk = blocks()
    with torch.no_grad():  # q → M q, k → M⁻ᵀ k per head
        a.query.weight.copy_(mq.T @ a.query.weight), a.query.bias.copy_(mq.T @ a.query.bias)
        a.key.weight.copy_(mk.T @ a.key.weight), a.key.bias.copy_(mk.T @ a.key.bias)
    m2 = copy.deepcopy(model)
    a = layer(m2).attention
    nv, nvit = blocks()
    with torch.no_grad():  # v → N v per head, dense columns → N⁻¹
        a.value.weight.copy_(nv.T @ a.value.weight), a.value.bias.copy_(nv.T @ a.value.bias)
        a.dense.weight.copy_(a.dense.weight @ nvit)
    m3 = copy.deepcopy(model)
    f = layer(m3)
    perm = torch.randperm(32, generator=g)
    with torch.no_grad():
        f.ffn.weight.copy_(f.ffn.weight[perm]), f.ffn.bias.copy_(f.ffn.bias[perm])
        f.ffn_output.weight.copy_(f.ffn_output.weight[:, perm])
    for m in (m1, m2, m3):
        assert _rel(out(m), ref) < 1e-12
    for s in shared:  # the library's transform of the shared slices, on the fresh inputs
        m = copy.deepcopy(model)
        s.transform(m, s.random_element(g, dtype=D))
        assert _rel(out(m), ref) < 1e-12, s
    # control: the query scaled alone is not a symmetry
    m4 = copy.deepcopy(model)
    with torch.no_grad():
        layer(m4).attention.query.weight.mul_(3.0)
    assert _rel(out(m4), ref) > 1e-6  # small: initial weights std 0.02; symmetric ones < 1e-12
