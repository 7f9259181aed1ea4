"""find_symmetries through attention heads merged with the batch axis (``[b·h, T, d]`` for
``torch.bmm``), projections tiled over the batch with ``repeat``, and query/key layers whose units
meet in several contractions (DeBERTa's disentangled attention)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import rel_change as _rel
from neurothermo.symmetry import Symmetry

D = torch.float64
H, DH = 4, 4


def _heads(g: torch.Generator) -> torch.Tensor:
    """A strong random invertible per-head matrix: block-diagonal of ``I + N(0, 1)``."""
    return torch.block_diag(*(torch.eye(DH, dtype=D) + torch.randn(H, DH, DH, generator=g,
                                                                   dtype=D)))


def _rows(lin: nn.Linear, a: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight.copy_(a @ lin.weight)
        if lin.bias is not None:
            lin.bias.copy_(a @ lin.bias)


def _qk(report: nt.SymmetryReport) -> list[Symmetry]:
    return [s for s in report if s.kind == "double_rotation" and "·" in s.location]


class MergedAttention(nn.Module):
    """Content and relative-position attention with DeBERTa's layout: heads merged with the batch
    (``view → permute → reshape(b·h, T, d)``), the projected position table tiled over the batch
    (``repeat``), and the same query/key projections applied to the content and the positions.
    ``layout="bad"`` merges the heads slowest for the query (head = index div b): the heads of the
    two sides no longer line up, and there is no per-head rotation; ``tile_inner`` tiles the
    position table along the heads' inner axis and reads a window across the copies."""

    def __init__(self, layout: str = "good", tile_inner: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, H * DH) for _ in range(3))
        self.o = nn.Linear(H * DH, 8)
        self.pos = nn.Parameter(torch.randn(5, 8))
        self.layout, self.tile_inner = layout, tile_inner

    def _split(self, x: torch.Tensor, slow: bool = False) -> torch.Tensor:
        b, t, _ = x.shape
        x = x.view(b, t, H, DH)
        x = x.permute(2, 0, 1, 3) if slow else x.permute(0, 2, 1, 3)
        return x.reshape(b * H, t, DH)

    def _pos(self, lin: nn.Linear, b: int) -> torch.Tensor:
        p = self._split(lin(self.pos).unsqueeze(0))
        if self.tile_inner:
            return p.repeat(b, 1, 2)[..., 1:DH + 1]  # a window across the tiled inner axis
        return p.repeat(b, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._split(self.q(x), slow=self.layout == "bad")
        k, v = self._split(self.k(x)), self._split(self.v(x))
        scores = q @ k.transpose(-1, -2) + (q @ self._pos(self.k, b).transpose(1, 2))[..., :t]
        scores = scores + (k @ self._pos(self.q, b).transpose(1, 2))[..., :t].transpose(1, 2)
        y = torch.bmm(scores.softmax(-1), v).view(b, H, t, DH).permute(0, 2, 1, 3)
        return self.o(y.reshape(b, t, H * DH))


def _model(**kw: object) -> MergedAttention:
    torch.manual_seed(0)
    return MergedAttention(**kw).to(D).eval()  # type: ignore[arg-type]


def test_merged_heads_give_both_rotations_and_they_hold_by_hand():
    model, x = _model(), torch.randn(3, 5, 8, dtype=D)
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    qk = _qk(report)
    assert len(qk) == 1 and qk[0].block == DH, str(report)
    roles = {s.name: s.role for s in qk[0].slices}
    assert roles == {"q.weight": "in", "q.bias": "in", "k.weight": "out", "k.bias": "out"}
    assert any(s.kind == "double_rotation" and s.location.startswith("v →") for s in report)
    g = torch.Generator().manual_seed(1)
    ref = model(x)
    for _ in range(3):
        m, a = copy.deepcopy(model), _heads(g)
        _rows(m.q, a)
        _rows(m.k, torch.linalg.inv(a).T)
        assert _rel(m(x), ref) <= 1e-12
        m, a = copy.deepcopy(model), _heads(g)
        _rows(m.v, a)
        with torch.no_grad():
            m.o.weight.copy_(m.o.weight @ torch.linalg.inv(a))
        assert _rel(m(x), ref) <= 1e-12
    m = copy.deepcopy(model)  # control: the query side alone
    _rows(m.q, _heads(g))
    assert _rel(m(x), ref) > 1e-4


@pytest.mark.parametrize("kw", [{"layout": "bad"}, {"tile_inner": True}])
def test_misaligned_heads_are_not_reported(kw):
    model, x = _model(**kw), torch.randn(3, 5, 8, dtype=D)
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    assert not _qk(report), str(report)
    g = torch.Generator().manual_seed(2)  # by hand: the per-head Q/K rotation does not hold
    m, a = copy.deepcopy(model), _heads(g)
    _rows(m.q, a)
    _rows(m.k, torch.linalg.inv(a).T)
    assert _rel(m(x), model(x)) > 1e-4


def _deberta(share: bool, pos: list[str]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    t = pytest.importorskip("transformers")
    cfg = t.DebertaV2Config(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=H,
        intermediate_size=32, max_position_embeddings=16, relative_attention=True,
        position_buckets=4, pos_att_type=pos, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, type_vocab_size=0, position_biased_input=False,
        norm_rel_ebd="layer_norm", share_att_key=share, max_relative_positions=-1)
    torch.manual_seed(0)
    model = t.DebertaV2Model(cfg).to(D).eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 32, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("pos", [["p2c", "c2p"], ["c2p"], ["p2c"]])
def test_deberta_shared_key_rotations(pos):
    """With ``share_att_key`` every score term is ``q·kᵀ`` through the same projections."""
    model, inputs = _deberta(True, pos)
    report = nt.find_symmetries(model, inputs, explain=True, progress=False)
    for layer in range(2):
        p = f"encoder.layer.{layer}.attention.self."
        qk = [s for s in _qk(report) if s.location.startswith(p)]
        assert len(qk) == 1, str(report)
        assert {(s.name, s.role) for s in qk[0].slices} == {
            (p + "query_proj.weight", "in"), (p + "query_proj.bias", "in"),
            (p + "key_proj.weight", "out"), (p + "key_proj.bias", "out")}
        assert any(s.location.startswith(p + "value_proj →") for s in report), str(report)
    ref, g = _out(model, inputs), torch.Generator().manual_seed(3)
    for layer in range(2):
        m, a = copy.deepcopy(model), _heads(g)
        att = m.encoder.layer[layer].attention  # type: ignore[union-attr,index]
        _rows(att.self.query_proj, a)
        _rows(att.self.key_proj, torch.linalg.inv(a).T)
        assert _rel(_out(m, inputs), ref) <= 1e-12
        m, a = copy.deepcopy(model), _heads(g)
        att = m.encoder.layer[layer].attention  # type: ignore[union-attr,index]
        _rows(att.self.value_proj, a)
        with torch.no_grad():
            att.output.dense.weight.copy_(att.output.dense.weight @ torch.linalg.inv(a))
        assert _rel(_out(m, inputs), ref) <= 1e-12


def test_deberta_separate_position_projections():
    """Without ``share_att_key`` the position scores use ``pos_key_proj`` / ``pos_query_proj``:
    the Q/K rotation alone changes the output; with the position projections rotated alongside
    (the query's partner ``pos_key_proj`` by ``G⁻ᵀ``, the key's ``pos_query_proj`` by ``G``) it
    holds, and that is the only Q/K pattern reported."""
    model, inputs = _deberta(False, ["p2c", "c2p"])
    report = nt.find_symmetries(model, inputs, explain=True, progress=False)
    ref, g = _out(model, inputs), torch.Generator().manual_seed(4)
    for layer in range(2):
        p = f"encoder.layer.{layer}.attention.self."
        qk = [s for s in _qk(report) if p in s.location]
        assert len(qk) == 1, str(report)
        roles = {s.name: s.role for s in qk[0].slices}
        assert roles == {p + f"{n}.{w}": r for n, r in (
            ("query_proj", "in"), ("pos_query_proj", "in"), ("key_proj", "out"),
            ("pos_key_proj", "out")) for w in ("weight", "bias")}
        att = model.encoder.layer[layer].attention.self  # type: ignore[union-attr,index]
        m, a = copy.deepcopy(model), _heads(g)
        sub = m.encoder.layer[layer].attention.self  # type: ignore[union-attr,index]
        _rows(sub.query_proj, a)
        _rows(sub.key_proj, torch.linalg.inv(a).T)
        assert _rel(_out(m, inputs), ref) > 1e-7  # control: Q/K alone is not a symmetry
        _rows(sub.pos_query_proj, a)
        _rows(sub.pos_key_proj, torch.linalg.inv(a).T)
        assert _rel(_out(m, inputs), ref) <= 1e-12
        assert att is not sub
