"""find_symmetries through a fused qkv projection laid out per head, ``[q_h, k_h, v_h]`` for each
head ``h`` and split with ``chunk(3, dim=-1)`` after ``view(b, t, heads, 3·d)`` (GPT-NeoX): one
segment of ``d`` rows per head and part (``q`` of head ``h``: rows ``3hd : 3hd + d``), a Q/K
rotation per head and a V/O rotation per head, each checked by hand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import neurothermo as nt
from _helpers import rel_change as _rel
from neurothermo.symmetry import Symmetry

D = torch.float64
H, HD = 2, 3
X = torch.randn(4, 5, H * HD, dtype=D, generator=torch.Generator().manual_seed(1))


class Interleaved(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(H * HD, 3 * H * HD), nn.Linear(H * HD, H * HD)
        self.head = nn.Linear(H * HD, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, H, 3 * HD).transpose(1, 2).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(torch.tanh(self.o(y.transpose(1, 2).reshape(b, t, H * HD))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Interleaved().to(D)


def _rows(h: int, part: int) -> slice:
    start = h * 3 * HD + part * HD
    return slice(start, start + HD)


def _g(seed: int) -> Tensor:
    return torch.randn(HD, HD, dtype=D, generator=torch.Generator().manual_seed(seed)) \
        + 2 * torch.eye(HD, dtype=D)


def _rotations(syms: list[Symmetry]) -> list[str]:
    return sorted(s.location.split(" (")[0] for s in syms if s.kind == "double_rotation")


def test_one_qk_and_one_vo_rotation_per_head():
    model = _model()
    syms = nt.find_symmetries(model, X)
    assert _rotations(syms) == sorted([
        "qkv[0:3] · qkv[3:6]ᵀ", "qkv[6:9] → attention → o", "qkv[9:12] · qkv[12:15]ᵀ",
        "qkv[15:18] → attention → o"]), [str(s) for s in syms]
    fresh = torch.randn(3, 7, H * HD, dtype=D, generator=torch.Generator().manual_seed(2))
    for s in syms:
        moved = s.transform(copy.deepcopy(model), s.random_element(torch.Generator().manual_seed(3),
                                                                   dtype=D))
        assert _rel(moved(fresh), model(fresh)) < 1e-12, str(s)


@pytest.mark.parametrize("h", [0, 1])
def test_per_head_rotations_by_hand(h):
    """G on q rows of head h, G⁻ᵀ on its k rows; G on its v rows, G⁻ᵀ on its o columns: the
    output is unchanged and transform does the same. The timm layout's rows (q of head h at
    rows h·d of the first third) instead change it."""
    model = _model()
    syms = nt.find_symmetries(model, X)
    g, gi = _g(h), torch.linalg.inv(_g(h))
    hand = copy.deepcopy(model)
    with torch.no_grad():
        w, b = hand.qkv.weight, hand.qkv.bias
        q, k, v = _rows(h, 0), _rows(h, 1), _rows(h, 2)
        w[q], b[q] = g @ w[q], g @ b[q]
        w[k], b[k] = gi.T @ w[k], gi.T @ b[k]
        w[v], b[v] = g @ w[v], g @ b[v]
        cols = slice(h * HD, (h + 1) * HD)
        hand.o.weight[:, cols] = hand.o.weight[:, cols] @ gi
    assert _rel(hand(X), model(X)) < 1e-12
    mine = copy.deepcopy(model)
    for s in syms:
        if s.kind == "double_rotation" and s.location.startswith(f"qkv[{_rows(h, 0).start}:"):
            s.transform(mine, g)
        if s.kind == "double_rotation" and s.location.startswith(f"qkv[{_rows(h, 2).start}:"):
            s.transform(mine, g)
    for (name, p), r in zip(mine.named_parameters(), hand.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-13, msg=name)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        w, b = wrong.qkv.weight, wrong.qkv.bias
        q, k = slice(h * HD, (h + 1) * HD), slice(H * HD + h * HD, H * HD + (h + 1) * HD)
        w[q], b[q] = g @ w[q], g @ b[q]
        w[k], b[k] = gi.T @ w[k], gi.T @ b[k]
    assert _rel(wrong(X), model(X)) > 1e-3


def test_gpt_neox_value_output_rotation_per_head():
    """Tiny GPTNeoXForCausalLM: V/O per head (rows 16:24 and 40:48 of query_key_value); Q/K is
    cut by the partial rotary embedding (a slice of each head's features), said so."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=32)
    model = transformers.GPTNeoXForCausalLM(cfg).to(D).eval()
    report = nt.find_symmetries(model, {"input_ids": torch.randint(0, 32, (4, 7))}, explain=True,
                                progress=False)
    p = "gpt_neox.layers.0.attention."
    assert _rotations(list(report)) == [f"{p}query_key_value[16:24] → attention → {p}dense",
                                        f"{p}query_key_value[40:48] → attention → {p}dense"]
    assert any(r.location == f"{p}query_key_value[0:8]" for r in report.rejected), str(report)
    fresh = {"input_ids": torch.randint(0, 32, (5, 9), generator=torch.Generator().manual_seed(1))}
    for s in report:
        assert nt.verify_symmetry(model, s, fresh) < 1e-12, str(s)
