"""find_symmetries through grouped layers: depthwise convolutions (one input channel per group)
and grouped-query attention (one key/value head shared by several query heads)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neurothermo as nt
from neurothermo.symmetry import Symmetry

D = torch.float64


def _by_kind(syms: list[Symmetry], kind: str, first: str) -> Symmetry:
    found = [s for s in syms if s.kind == kind and s.location.split()[0] == first]
    assert len(found) == 1, [str(s) for s in syms]
    return found[0]


def _depthwise(mid: nn.Module, mult: int = 2) -> nn.Module:
    """conv → ``mid`` → depthwise conv (``mult`` filters per channel) → ReLU → 1×1 conv → head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), mid, nn.Conv2d(8, 8 * mult, 3, padding=1, groups=8),
        nn.ReLU(), nn.Conv2d(8 * mult, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).to(D).eval()


@pytest.mark.parametrize(("mid", "kinds"), [
    (nn.ReLU(), {"rescale"}), (nn.Tanh(), {"sign_flip"}), (nn.Identity(), {"rescale", "sign_flip"}),
])
def test_depthwise_consumer_keeps_the_diagonal_symmetries(mid, kinds):
    """Before: '2' is a grouped convolution over the units, nothing reported for conv 0."""
    model = _depthwise(mid)
    report = nt.find_symmetries(model, torch.randn(4, 3, 8, 8, dtype=D), explain=True)
    into = {s.kind for s in report if s.location.startswith("0 ")}
    assert into == kinds, str(report)
    fresh = torch.randn(5, 3, 9, 9, dtype=D, generator=torch.Generator().manual_seed(3))
    for s in report:
        assert nt.verify_symmetry(model, s, fresh) < 1e-12, str(s)
    if isinstance(mid, nn.Identity):  # a linear link: the rotation is ruled out, with the reason
        assert any("'2' is a depthwise convolution" in r.reason and r.kind == "double_rotation"
                   for r in report.rejected), str(report)


def test_depthwise_rescale_by_hand():
    """Channel c of conv 0 scaled by s_c, output channels 2c, 2c+1 of the depthwise conv (the only
    ones reading channel c) divided by s_c: the transform does exactly that, outputs unchanged."""
    model = _depthwise(nn.ReLU())
    x = torch.randn(4, 3, 8, 8, dtype=D)
    sym = _by_kind(nt.find_symmetries(model, x), "rescale", "0")
    assert sym.n_units == 8 and {sl.name for sl in sym.slices} == {"0.weight", "0.bias", "2.weight"}
    s = torch.rand(8, dtype=D, generator=torch.Generator().manual_seed(1)) + 0.5
    hand = copy.deepcopy(model)
    with torch.no_grad():
        hand[0].weight.mul_(s[:, None, None, None])
        hand[0].bias.mul_(s)
        hand[2].weight.div_(s.repeat_interleave(2)[:, None, None, None])
        moved = sym.transform(copy.deepcopy(model), s)
        ref, out = model(x), hand(x)
    assert float((out - ref).abs().max()) < 1e-12 * float(ref.abs().max())
    for (name, p), q in zip(moved.named_parameters(), hand.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-15, atol=0, msg=name)
    assert float((hand[2].weight - model[2].weight).detach().abs().max()) > 1e-2


def test_depthwise_permutations_are_ruled_out_by_structure():
    """Permuting the channels into or out of a depthwise conv changes which channel each filter
    reads: the rules must not propose it (before: the depthwise conv's output channels were a
    permutation candidate that only the numerical check threw out)."""
    model = _depthwise(nn.ReLU(), mult=1)
    x = torch.randn(4, 3, 8, 8, dtype=D)
    report = nt.find_symmetries(model, x, explain=True)
    assert not [s for s in report if s.kind == "permutation"], str(report)
    assert not [r for r in report.rejected if r.kind == "permutation"], str(report)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in (moved[0].weight, moved[0].bias, moved[2].weight):
            p.copy_(p[perm])
        assert float((moved(x) - model(x)).abs().max()) > 1e-3


def test_grouped_conv_with_several_inputs_per_group_is_rejected_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(D)
    report = nt.find_symmetries(model, torch.randn(4, 3, 8, 8, dtype=D), explain=True)
    assert not [s for s in report if s.location.startswith("0 ")]
    assert any("4 input channels per group" in r.reason for r in report.rejected), str(report)
    # the grouped conv as a producer: its output channels are scaled, never rotated
    assert {s.kind for s in report if s.location.startswith("2 ")} == {"rescale", "sign_flip"}


class GQA(nn.Module):
    """Grouped-query attention: 4 query heads, 2 key/value heads of width 3, shared by
    ``repeat_kv`` (expand + reshape), ``repeat_interleave`` or sdpa's ``enable_gqa``."""

    def __init__(self, share: str, heads: int = 4, kv: int = 2, hd: int = 3) -> None:
        super().__init__()
        self.share, self.heads, self.kv, self.hd = share, heads, kv, hd
        d = heads * hd
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, kv * hd), nn.Linear(d, kv * hd)

    def _repeat(self, z: torch.Tensor) -> torch.Tensor:
        b, _, t, hd = z.shape
        rep = self.heads // self.kv
        if self.share in ("expand", "eager"):
            return z[:, :, None].expand(b, self.kv, rep, t, hd).reshape(b, self.heads, t, hd)
        return z.repeat_interleave(rep, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        if self.share == "eager":  # Hugging Face's eager attention: repeat_kv, then matmuls
            att = (q @ self._repeat(k).transpose(2, 3)) / self.hd ** 0.5
            y = att.softmax(-1) @ self._repeat(v)
        elif self.share == "enable_gqa":
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = nn.functional.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v),
                                                           is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * self.hd))


def _vo_pairs(report: nt.SymmetryReport) -> list[Symmetry]:
    return [s for s in report if s.kind == "double_rotation" and s.location.startswith("v")]


@pytest.mark.parametrize("share", ["expand", "repeat_interleave", "enable_gqa", "eager"])
def test_gqa_value_output_rotation_per_shared_head(share):
    """Before: 'unsupported operation expand' (resp. repeat_interleave; enable_gqa: a wrong
    candidate; eager: 'matmul' uses the fused units before they are split). Now one rotation per
    value head j: v rows 3j:3j+3, o columns of heads 2j, 2j+1."""
    torch.manual_seed(0)
    model = GQA(share).to(D)
    report = nt.find_symmetries(model, torch.randn(3, 5, 12, dtype=D), explain=True)
    vo = _vo_pairs(report)
    assert [s.location.split()[0] for s in vo] == ["v[0:3]", "v[3:6]"], str(report)
    for j, s in enumerate(vo):
        assert (s.n_units, s.block, s.charge_shape) == (3, 3, (3, 3))
        cols = sorted((sl.start, sl.stop) for sl in s.slices if sl.name == "o.weight")
        assert cols == [(6 * j, 6 * j + 3), (6 * j + 3, 6 * j + 6)]
        fresh = torch.randn(4, 6, 12, dtype=D, generator=torch.Generator().manual_seed(j))
        assert nt.verify_symmetry(model, s, fresh) < 1e-12, str(s)
    assert any("query-key rotation is not searched" in r.reason for r in report.rejected), str(report)


def test_gqa_rotation_by_hand():
    """G on value head 1 (rows 3:6 of v), G⁻ᵀ on the columns of query heads 2 and 3 of o (6:9,
    9:12): the output is unchanged, and transform does exactly this; leaving out one query
    head's columns changes the output."""
    torch.manual_seed(0)
    model = GQA("expand").to(D)
    x = torch.randn(3, 5, 12, dtype=D)
    sym = _vo_pairs(nt.find_symmetries(model, x, explain=True))[1]
    g = torch.randn(3, 3, dtype=D, generator=torch.Generator().manual_seed(2)) + 2 * torch.eye(3, dtype=D)
    hand, partial = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for m, heads in ((hand, (6, 9)), (partial, (6,))):
            m.v.weight[3:6] = g @ m.v.weight[3:6]
            m.v.bias[3:6] = g @ m.v.bias[3:6]
            for c in heads:
                m.o.weight[:, c:c + 3] = m.o.weight[:, c:c + 3] @ torch.linalg.inv(g)
        moved = sym.transform(copy.deepcopy(model), g)
        ref = model(x)
        assert float((hand(x) - ref).abs().max()) < 1e-12
        assert float((partial(x) - ref).abs().max()) > 1e-3
    for (name, p), q in zip(moved.named_parameters(), hand.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize(("kv", "attn"), [(2, "sdpa"), (4, "sdpa"), (2, "eager")])
def test_llama_gqa_value_output_rotation(kv, attn):
    """Tiny LlamaForCausalLM: one V/O rotation per key/value head (4 value heads: one over all
    of them, as before), each exact on fresh inputs, weights randomised away from the init.
    Eager attention (``softmax(q·kᵀ) @ v`` after ``repeat_kv``, as Qwen2/Mistral use it) too."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=kv, max_position_embeddings=32,
                                   attn_implementation=attn)
    model = transformers.LlamaForCausalLM(cfg).to(D).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    report = nt.find_symmetries(model, {"input_ids": torch.randint(0, 32, (4, 7))}, explain=True,
                                progress=False)
    vo = [s for s in report if s.kind == "double_rotation"]
    assert len(vo) == (2 if kv == 2 else 1), str(report)
    assert all("v_proj" in s.location and "o_proj" in s.location for s in vo)
    assert sum(s.n_units for s in vo) == 4 * kv
    fresh = {"input_ids": torch.randint(0, 32, (5, 9), generator=torch.Generator().manual_seed(1))}
    for s in vo:
        assert nt.verify_symmetry(model, s, fresh) < 1e-12, str(s)
    if kv == 2:  # by hand: head 0 of v, columns of query heads 0 and 1 of o
        attn = model.model.layers[0].self_attn
        g = torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(3)) + 2 * torch.eye(4, dtype=D)
        moved = copy.deepcopy(model)
        mattn = moved.model.layers[0].self_attn
        with torch.no_grad():
            mattn.v_proj.weight[:4] = g @ attn.v_proj.weight[:4]
            mattn.o_proj.weight[:, :8] = attn.o_proj.weight[:, :8] @ torch.block_diag(
                torch.linalg.inv(g), torch.linalg.inv(g))
            ref, out = model(**fresh).logits, moved(**fresh).logits
        assert float((out - ref).abs().max()) < 1e-12 * float(ref.abs().max())
        assert float((mattn.o_proj.weight - attn.o_proj.weight).detach().abs().max()) > 1e-2


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_eager_qwen2_and_mistral_keep_the_value_output_rotations(family):
    """Before: "'matmul' uses the fused units before they are split" and no V/O rotation in eager
    attention. Now the same as with sdpa: one V/O rotation per value head, the SwiGLU units and
    the RMSNorm gains, each exact on fresh inputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attn_implementation="eager")
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).to(D).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    syms = nt.find_symmetries(model, {"input_ids": torch.randint(0, 32, (4, 7))}, progress=False)
    p = "model.layers.0."
    assert sorted((s.kind, s.location.split()[0], s.n_units) for s in syms) == sorted([
        ("double_rotation", p + "self_attn.v_proj[0:4]", 4),
        ("double_rotation", p + "self_attn.v_proj[4:8]", 4),
        ("rescale", p + "input_layernorm", 16), ("rescale", p + "post_attention_layernorm", 16),
        ("permutation", p + "mlp.gate_proj", 32), ("rescale", p + "mlp.up_proj", 32),
        ("sign_flip", p + "mlp.up_proj", 32), ("rescale", "model.norm", 16)]), [str(s) for s in syms]
    fresh = {"input_ids": torch.randint(0, 32, (5, 9), generator=torch.Generator().manual_seed(1))}
    for s in syms:
        assert nt.verify_symmetry(model, s, fresh) < 1e-12, str(s)
