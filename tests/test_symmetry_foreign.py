"""find_symmetries on the foreign-model zoo: the symmetries a reader of the paper would list, and
no false one (every reported symmetry re-checked on a float64 copy with fresh inputs)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neurothermo as nt
from foreign_models import CASE_IDS, CASES, HAS_TRANSFORMERS, case, logits_of, skip_unavailable
from neurothermo.symmetry import Symmetry

D = torch.float64


def _resnet_expected() -> list[tuple[str, str, int, bool]]:
    """torchvision ResNet-18 (width 8) in train mode, per BasicBlock: conv1 → BN and conv2 → BN
    scale (approximate: eps > 0), BN1 affine → ReLU → conv2 rescale, the hidden channels of
    conv1 → bn1 → relu → conv2 permuted; conv → BN scale of the stem and of each downsample.
    Everything that reaches the residual stream is blocked (the stream does not transform)."""
    out = [("scale", "conv1", 8, False)]
    for stage, width in zip((1, 2, 3, 4), (8, 16, 32, 64)):
        for blk in (0, 1):
            p = f"layer{stage}.{blk}"
            out += [("scale", f"{p}.conv1", width, False), ("scale", f"{p}.conv2", width, False),
                    ("rescale", f"{p}.bn1", width, True), ("permutation", f"{p}.conv1", width, True)]
        if stage > 1:
            out.append(("scale", f"layer{stage}.0.downsample.0", width, False))
    return out


def _transformer_expected(prefix: str, q: str, v: str, mlp: str, hidden: int, heads: int,
                          pre_ln: tuple[str, ...]) -> list[tuple[str, str, int, bool]]:
    out = []
    for b in range(2):
        p = prefix.format(b)
        out += [("double_rotation", p + q, 32, True), ("double_rotation", p + v, 32, True),
                ("permutation", p + mlp, hidden, True)]
        out += [("rescale", p + ln, 32, True) for ln in pre_ln]
    return out


# (kind, first token of the location, units, exact) per model: what the architecture admits.
EXPECTED: dict[str, list[tuple[str, str, int, bool]]] = {
    "resnet18": _resnet_expected(),
    # timm ViT: per block per-head Q/K and V/O rotations through the fused qkv rows (q = rows
    # 0:32, k = 32:64, v = 64:96), the GELU MLP's permutation, LayerNorm affine → next Linear
    # rescales (norm1 → qkv, norm2 → fc1, final norm → head).
    "vit": [*_transformer_expected("blocks.{}.", "attn.qkv[0:32]", "attn.qkv[64:96]", "mlp.fc1",
                                   128, 4, ("norm1", "norm2")), ("rescale", "norm", 32, True)],
    # HF BERT (post-LN): per layer Q/K and V/O per head and the intermediate GELU permutation;
    # the last LayerNorm's affine → pooler rescale; pooler → tanh → classifier sign flip and
    # permutation. Every other LayerNorm output enters the residual stream.
    "bert": [*_transformer_expected("bert.encoder.layer.{}.", "attention.self.query",
                                    "attention.self.value", "intermediate.dense", 64, 2, ()),
             ("rescale", "bert.encoder.layer.1.output.LayerNorm", 32, True),
             ("sign_flip", "bert.pooler.dense", 32, True),
             ("permutation", "bert.pooler.dense", 32, True)],
    # HF GPT-2 (pre-LN, Conv1D weights [in, out], fused c_attn split in three): per block Q/K
    # and V/O per head, MLP permutation through Conv1D, ln_1 → c_attn and ln_2 → c_fc rescales.
    # ln_f → lm_head is not one: lm_head is tied to the input embedding.
    "gpt2": _transformer_expected("transformer.h.{}.", "attn.c_attn[0:32]", "attn.c_attn[64:96]",
                                  "mlp.c_fc", 128, 2, ("ln_1", "ln_2")),
    # LSTM / GRU: hidden units permuted (all gates together) and sign-flipped (cell/candidate
    # gate rows and every W_hh column), consumed by the head.
    "lstm": [("permutation", "rnn", 24, True), ("sign_flip", "rnn", 24, True)],
    "gru": [("permutation", "rnn", 24, True), ("sign_flip", "rnn", 24, True)],
    # GroupNorm(4): conv → GN scale per group of channels (approximate), GN affine → ReLU →
    # next layer rescales (through the average pool into the classifier for the second).
    "groupnorm_cnn": [("scale", "features.0", 4, False), ("scale", "features.3", 4, False),
                      ("rescale", "features.1", 8, True), ("rescale", "features.4", 16, True)],
    # HF Llama (2 layers, d = 32, 4 query heads sharing 2 key/value heads of 8, SwiGLU of 64,
    # LlamaRMSNorm traced as arithmetic times a [32] weight, untied lm_head). Per layer: one V/O
    # rotation per shared value head (v_proj rows 0:8 and 8:16, each with the o_proj columns of
    # the 2 query heads that read it); the SwiGLU units permuted jointly (gate rows, up rows,
    # down columns), rescaled and sign-flipped through the linear up branch (nothing through
    # SiLU(gate)); input_layernorm → q/k/v and post_attention_layernorm → gate/up gain
    # rescales; model.norm → lm_head. Not searched: Q/K of shared key heads (a key head would
    # rotate with all its query heads at once; rotary embeddings rule most of it out anyway).
    # o_proj and down_proj enter the residual stream; lm_head's units reach the output.
    "llama": [
        (kind, f"model.layers.{i}.{where}", n, True)
        for i in (0, 1)
        for kind, where, n in (
            ("double_rotation", "self_attn.v_proj[0:8]", 8),
            ("double_rotation", "self_attn.v_proj[8:16]", 8),
            ("permutation", "mlp.gate_proj", 64), ("rescale", "mlp.up_proj", 64),
            ("sign_flip", "mlp.up_proj", 64), ("rescale", "input_layernorm", 32),
            ("rescale", "post_attention_layernorm", 32))
    ] + [("rescale", "model.norm", 32, True)],
    # HF T5 (one layer each side, 2 heads × 16, ReLU feed-forward of 64, T5LayerNorm gains):
    # per attention (encoder self, decoder self, decoder cross) Q/K and V/O per head (the
    # relative bias is added to the logits, which the Q/K rotation keeps), each gain → the
    # Linears it feeds (self-attention q, k, v; cross-attention q; feed-forward wi), the
    # feed-forward units' rescale and permutation (ReLU). Not: encoder.final_layer_norm →
    # cross-attention k, v (its output is also the model's encoder_last_hidden_state), the
    # decoder's final norm → lm_head (tied to the shared embedding).
    **{name: [
        *[(kind, f"{side}.block.0.{where}", n, True)
          for side, attn in (("encoder", ("layer.0.SelfAttention",)),
                             ("decoder", ("layer.0.SelfAttention", "layer.1.EncDecAttention")))
          for a in attn
          for kind, where, n in (("double_rotation", f"{a}.q", 32),
                                 ("double_rotation", f"{a}.v", 32))],
        *[("rescale", f"{side}.block.0.layer.{i}.layer_norm", 32, True)
          for side, layers in (("encoder", (0, 1)), ("decoder", (0, 1, 2))) for i in layers],
        *[(kind, f"{side}.block.0.layer.{i}.DenseReluDense.wi", 64, True)
          for side, i in (("encoder", 1), ("decoder", 2))
          for kind in ("rescale", "permutation")]]
       for name in ("t5", "t5_frozen_bias")},
    # tied LM: tanh then LayerNorm over the units breaks rescale, sign flip and permutation
    # (LayerNorm's statistics mix the units); the norm → lm_head rescale moves the tied weight.
    "tied_lm": [],
    # torch's nn.TransformerEncoder (pre-norm, 2 layers, d = 32, 2 heads, ReLU feed-forward of
    # 64): per layer Q/K and V/O per head of its nn.MultiheadAttention, norm1 → attention and
    # norm2 → linear1 rescales, the feed-forward units' rescale and permutation. linear2 and the
    # attention's output enter the residual stream; the head's units reach the output.
    "torch_encoder": [
        (kind, f"enc.layers.{i}.{where}", n, True)
        for i in (0, 1)
        for kind, where, n in (("double_rotation", "self_attn:", 32), ("double_rotation", "self_attn:", 32),
                               ("rescale", "norm1", 32), ("rescale", "norm2", 32),
                               ("rescale", "linear1", 64), ("permutation", "linear1", 64))],
}


def _summary(syms: list[Symmetry]) -> list[tuple[str, str, int, bool]]:
    return sorted((s.kind, s.location.split()[0], s.n_units, s.exact) for s in syms)


def _forward(c, model, inputs):
    with torch.no_grad():
        return logits_of(c.forward(model, inputs))


def _change(c, model, sym, inputs, gen) -> float:
    """Relative output change of a transformed copy (independent of verify_symmetry)."""
    ref = _forward(c, model, inputs)
    moved = copy.deepcopy(model)
    sym.transform(moved, sym.random_element(gen, dtype=D))
    out = _forward(c, moved, inputs)
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _tiny_eps(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
            mod.eps = torch.finfo(D).tiny
    return m


@pytest.fixture(scope="module")
def reports() -> dict[str, nt.SymmetryReport]:
    out = {}
    for c in CASES:
        if c.hf and not HAS_TRANSFORMERS:
            continue
        model = c.model()
        inputs, _ = c.data(b=4, seed=0)
        out[c.name] = nt.find_symmetries(model, inputs, explain=True, progress=False)
    return out


@pytest.mark.parametrize("name", CASE_IDS)
def test_zoo_gives_the_expected_symmetries(name, reports):
    skip_unavailable(case(name))
    report = reports[name]
    assert _summary(list(report)) == sorted(EXPECTED[name]), str(report)
    assert not report.opaque
    assert all(b.status == "analysed" for b in report.blocks)


@pytest.mark.parametrize("name", CASE_IDS)
def test_every_reported_symmetry_holds_on_fresh_float64_inputs(name, reports):
    """Exact ones change a float64 copy's outputs only by rounding (≤ 1e-10 relative, float64 ε
    times the depth's error growth); approximate ones change them by more than that and at most
    approx_tol, and by rounding only once every eps is at its limit 0 (the dtype's tiniest)."""
    c = case(name)
    skip_unavailable(c)
    model = c.model(dtype=D)
    inputs, _ = c.data(b=5, seed=1, dtype=D)
    gen = torch.Generator().manual_seed(7)
    for sym in reports[name]:
        change = _change(c, model, sym, inputs, gen)
        if sym.exact:
            assert change <= 1e-10, (str(sym), change)
        else:
            assert 1e-10 < change <= 1e-2, (str(sym), change)
            assert _change(c, _tiny_eps(model), sym, inputs, gen) <= 1e-10, str(sym)


def test_hf_models_are_captured_with_dynamo_and_say_why(reports):
    skip_unavailable(case("bert"))
    for name in ("bert", "gpt2"):
        (block,) = reports[name].blocks
        assert block.how == "dynamo" and block.path == ""
        assert block.reason == ""  # keyword inputs: dynamo directly, no failed fx attempt


def test_fused_qkv_rotation_by_hand():
    """Rotating head 1 of q by G and of k by G⁻ᵀ (rows of the fused qkv weight and bias) leaves
    the ViT's output unchanged; the reported symmetry acts on exactly those rows."""
    c = case("vit")
    model = c.model(dtype=D)
    x, _ = c.data(b=3, seed=2, dtype=D)
    (qk,) = [s for s in nt.find_symmetries(model, x) if s.location.startswith("blocks.0.attn.qkv[0:32]")]
    assert {(s.name, s.start, s.stop, s.role) for s in qk.slices} == {
        ("blocks.0.attn.qkv.weight", 0, 32, "in"), ("blocks.0.attn.qkv.bias", 0, 32, "in"),
        ("blocks.0.attn.qkv.weight", 32, 64, "out"), ("blocks.0.attn.qkv.bias", 32, 64, "out")}
    g = torch.linalg.matrix_exp(0.3 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0),
                                                  dtype=D))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        w, b = moved.blocks[0].attn.qkv.weight, moved.blocks[0].attn.qkv.bias
        h = slice(8, 16)  # head 1 of q; head 1 of k is rows 40:48
        w[h], b[h] = g @ w[h], g @ b[h]
        gi = torch.linalg.inv(g).T
        w[40:48], b[40:48] = gi @ w[40:48], gi @ b[40:48]
    torch.testing.assert_close(moved(x), model(x), rtol=1e-12, atol=1e-12)
    element = torch.eye(8, dtype=D).repeat(4, 1, 1)
    element[1] = g
    mine = copy.deepcopy(model)
    qk.transform(mine, element)
    for (n, p), q in zip(mine.named_parameters(), moved.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13, msg=n)


def test_gpt2_conv1d_permutation_moves_columns_in_and_rows_out():
    c = case("gpt2")
    skip_unavailable(c)
    model = c.model(dtype=D)
    x, _ = c.data(b=2, seed=3, dtype=D)
    (perm,) = [s for s in nt.find_symmetries(model, x) if s.kind == "permutation"
               and s.location.startswith("transformer.h.0")]
    roles = {(s.name, s.dim, s.role) for s in perm.slices}
    assert ("transformer.h.0.mlp.c_fc.weight", 1, "in") in roles  # Conv1D weight is [in, out]
    assert ("transformer.h.0.mlp.c_proj.weight", 0, "out") in roles
    p = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        mlp = moved.transformer.h[0].mlp
        mlp.c_fc.weight.copy_(mlp.c_fc.weight[:, p])
        mlp.c_fc.bias.copy_(mlp.c_fc.bias[p])
        mlp.c_proj.weight.copy_(mlp.c_proj.weight[p])
    torch.testing.assert_close(logits_of(moved(**x)), logits_of(model(**x)), rtol=1e-12, atol=1e-12)


def test_torch_transformer_encoder_layer_is_searched_inside() -> None:
    """nn.TransformerEncoderLayer is a torch module but a composite one: per head its attention's
    Q/K and V/O rotate, its feed-forward units (linear1 → ReLU → linear2) rescale and permute, and
    norm1's and norm2's affines rescale into the attention and linear1. It used to be kept as one
    opaque leaf with no symmetry found and none reported missing. Each reported symmetry is
    checked against the model's own outputs on fresh inputs, and one by hand."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(16 * 6, 3)).to(D).eval()
    x = torch.randn(4, 6, 16, dtype=D)
    fast = torch.backends.mha.get_fastpath_enabled()
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    assert torch.backends.mha.get_fastpath_enabled() == fast  # the caller's flag is back
    found = {(s.kind, s.location.split(" (")[0]) for s in report}
    # traced through (the fast-path test is decided with the flag off), so the attention's own
    # rotations and the norm1 → attention rescale are found too, as for a bare MHA
    assert found == {
        ("rescale", "0.norm1 → 0.self_attn"),
        ("double_rotation", "0.self_attn: query·keyᵀ per head"),
        ("double_rotation", "0.self_attn: value → out_proj per head"),
        ("rescale", "0.norm2 → 0.linear1"),
        ("rescale", "0.linear1 → relu → 0.dropout → 0.linear2"),
        ("permutation", "0.linear1 → relu → 0.dropout → 0.linear2"),
    }, found
    assert "analysed via fx" in str(report)
    fresh = torch.randn(5, 6, 16, dtype=D)
    for sym in nt.find_symmetries(model, x, progress=False):
        assert nt.verify_symmetry(model, sym, fresh) < 1e-12  # largest output change
    # the reference by hand: scale linear1's rows (and bias) by s, divide linear2's columns by s
    other = copy.deepcopy(model)
    s = torch.rand(32, dtype=D) + 0.5
    with torch.no_grad():
        other[0].linear1.weight.mul_(s[:, None])
        other[0].linear1.bias.mul_(s)
        other[0].linear2.weight.div_(s[None, :])
    torch.testing.assert_close(other(fresh), model(fresh), rtol=0, atol=1e-13)
