from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neurothermo.alignment import capture_features
from neurothermo.models.transformer import TinyTransformer

V = 11


def _model(seed: int = 0, **kw) -> TinyTransformer:
    args = {"vocab_size": V, "d_model": 16, "n_layers": 3, "n_heads": 4, "max_len": 12} | kw
    return TinyTransformer(**args, generator=torch.Generator().manual_seed(seed)).double()


def _tokens(b: int = 5, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


def _reference_forward(m: TinyTransformer, tokens: torch.Tensor):
    """The module docstring's equations, written out with torch's own attention (SDPA) as reference."""
    x = m.tok_emb.weight[tokens] + m.pos_emb.weight[: tokens.shape[1]]
    attn_out, mlp_out = [], []
    for blk in m.blocks:
        a_in = F.layer_norm(x, x.shape[-1:], blk.ln1.weight, blk.ln1.bias)
        b, t, d = a_in.shape
        att = blk.attn
        q, k, v = (F.linear(a_in, lin.weight, lin.bias).view(b, t, att.n_heads, -1).transpose(1, 2)
                   for lin in (att.q, att.k, att.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        a = F.linear(y, att.o.weight, att.o.bias)
        x = x + a
        m_in = F.layer_norm(x, x.shape[-1:], blk.ln2.weight, blk.ln2.bias)
        mo = F.linear(F.gelu(F.linear(m_in, blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                      blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        x = x + mo
        attn_out.append(a)
        mlp_out.append(mo)
    logits = F.linear(F.layer_norm(x, x.shape[-1:], m.ln_f.weight, m.ln_f.bias), m.head.weight, m.head.bias)
    return logits, attn_out, mlp_out


def _randomize_norms(m: TinyTransformer, seed: int) -> None:
    """LayerNorm weight 1 / bias 0 at init would hide a swapped ln1/ln2; make them distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_shapes_and_names() -> None:
    m = _model()
    assert m(_tokens()).shape == (5, 12, V)
    assert m(_tokens(t=3)).shape == (5, 3, V)  # shorter than max_len is fine
    assert m.block_names("attn") == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert m.block_names("mlp") == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    modules = dict(m.named_modules())
    assert all(n in modules for n in m.block_names("attn") + m.block_names("mlp"))
    assert m.blocks[0].mlp.fc1.out_features == 64  # d_ff = 4·d_model by default


def test_forward_matches_the_written_out_equations() -> None:
    m = _model(3)
    _randomize_norms(m, 4)
    tokens = _tokens(seed=5)
    ref_logits, _, _ = _reference_forward(m, tokens)
    torch.testing.assert_close(m(tokens), ref_logits, rtol=1e-10, atol=1e-12)


def test_relu_variant() -> None:
    m = _model(activation="relu")
    h = torch.randn(4, 16, dtype=torch.float64)
    mlp = m.blocks[1].mlp
    torch.testing.assert_close(mlp(h), mlp.fc2(torch.relu(mlp.fc1(h))))


def test_attention_weights_are_causal_probabilities() -> None:
    m = _model(2)
    x = torch.randn(3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = m.blocks[0].attn.weights(x)
    assert w.shape == (3, 4, 12, 12)
    future = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert bool((w[..., future] == 0).all())
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, 12, dtype=torch.float64))
    assert bool((w[..., ~future] > 0).all())  # every past position gets some weight


@torch.no_grad()
def test_outputs_at_t_do_not_depend_on_later_tokens() -> None:
    m = _model(4)
    _randomize_norms(m, 5)
    tokens = _tokens(b=4, seed=6)
    names = m.block_names("attn") + m.block_names("mlp")
    base_logits = m(tokens)
    base = capture_features(m, tokens, layers=names, pool="flatten")
    for t in (0, 5, 10):
        changed = tokens.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.arange(11 - t) % (V - 1)) % V  # all differ
        logits = m(changed)
        feats = capture_features(m, changed, layers=names, pool="flatten")
        torch.testing.assert_close(logits[:, : t + 1], base_logits[:, : t + 1], rtol=0, atol=1e-12)
        for n in names:
            a, b = base[n].view(4, 12, 16), feats[n].view(4, 12, 16)
            torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-12)
        # ... while the later positions do change (the test is not vacuous)
        assert float((logits[:, t + 1:] - base_logits[:, t + 1:]).abs().max()) > 1e-4
    # and earlier tokens do reach later positions through attention
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % V
    assert float((m(changed)[:, -1] - base_logits[:, -1]).abs().max()) > 1e-6


def test_capture_returns_each_block_output_before_the_residual_add() -> None:
    m = _model(7, n_layers=2)
    _randomize_norms(m, 8)
    tokens = _tokens(b=3, t=9, seed=9)
    _, ref_attn, ref_mlp = _reference_forward(m, tokens)
    names = m.block_names("attn") + m.block_names("mlp")
    feats = capture_features(m, tokens, layers=names, pool="flatten")
    for i in range(2):
        torch.testing.assert_close(feats[f"blocks.{i}.attn"].view(3, 9, 16), ref_attn[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(feats[f"blocks.{i}.mlp"].view(3, 9, 16), ref_mlp[i], rtol=1e-10, atol=1e-12)
    # mean pooling over tokens is the mean of the per-token outputs
    pooled = capture_features(m, tokens, layers=names, pool="mean")
    torch.testing.assert_close(pooled["blocks.1.mlp"], ref_mlp[1].mean(dim=1), rtol=1e-10, atol=1e-12)


@torch.no_grad()
def test_init_is_seeded_and_has_the_documented_scales() -> None:
    a, b, c = (TinyTransformer(V, 256, 4, 4, max_len=64, generator=torch.Generator().manual_seed(s))
               for s in (0, 0, 1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    # 65k+ entries: the sample std is within 1.5% of the target (relative s.e. 1/√(2n) < 0.3%)
    assert float(a.blocks[0].attn.q.weight.std()) == pytest.approx(0.02, rel=0.015)
    assert float(a.blocks[2].mlp.fc1.weight.std()) == pytest.approx(0.02, rel=0.015)
    resid = 0.02 / math.sqrt(2 * 4)
    assert float(a.blocks[1].attn.o.weight.std()) == pytest.approx(resid, rel=0.015)
    assert float(a.blocks[3].mlp.fc2.weight.std()) == pytest.approx(resid, rel=0.015)
    assert bool((a.blocks[0].ln1.weight == 1).all()) and bool((a.blocks[0].attn.q.bias == 0).all())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"d_model": 10, "n_heads": 4}, "not divisible by n_heads"),
        ({"activation": "tanh"}, "unknown activation"),
        ({"n_layers": 0}, "n_layers must be a positive int"),
        ({"d_ff": -3}, "d_ff must be a positive int"),
        ({"vocab_size": 2.5}, "vocab_size must be a positive int"),
    ],
)
def test_bad_construction(kw, match) -> None:
    args = {"vocab_size": V, "d_model": 16, "n_layers": 2, "n_heads": 4} | kw
    with pytest.raises(ValueError, match=match):
        TinyTransformer(**args)


def test_bad_inputs() -> None:
    m = _model()
    with pytest.raises(ValueError, match="integer tensor of shape"):
        m(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        m(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_len=12"):
        m(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\)"):
        m(torch.full((1, 4), V, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\)"):
        m(torch.full((1, 4), -1, dtype=torch.long))
    with pytest.raises(ValueError, match="kind must be 'attn' or 'mlp'"):
        m.block_names("ffn")


def test_symmetries_of_the_project_transformer_are_found() -> None:
    # The input checks are skipped under graph capture, so find_symmetries sees every block: per
    # block the Q/K and V/O double rotations, the MLP permutation and the LayerNorm rescales.
    import neurothermo as nt

    m = TinyTransformer(12, d_model=16, n_layers=2, n_heads=2, max_len=8,
                        generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 12, (4, 8), generator=torch.Generator().manual_seed(1))
    found = {(s.kind, s.location) for s in nt.find_symmetries(m, x)}
    for i in range(2):
        assert ("double_rotation", f"blocks.{i}.attn.q · blocks.{i}.attn.kᵀ (2 heads × 8)") in found
        assert ("double_rotation", f"blocks.{i}.attn.v → blocks.{i}.attn.o (2 heads × 8)") in found
    with pytest.raises(ValueError, match="token ids must lie in"):
        m(torch.full((2, 4), 99))  # the checks still run outside capture
