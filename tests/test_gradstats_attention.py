"""nn.MultiheadAttention: the recorded (explicit-projection) forward equals torch's, and the
per-sample norms equal a loop of b backward passes, across the module's options (float64)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from _helpers import DT, RTOL, assert_matches_naive
from neurothermo.gradstats import per_sample_grad_norms
from neurothermo.gradstats._capture import Recorder, recording


@dataclass(frozen=True)
class Cfg:
    kind: str = "self"  # "self": q = k = v; "kv": k = v ≠ q; "qkv": all different
    batch_first: bool = True
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    kdim: int | None = None
    vdim: int | None = None
    kpm: bool = False  # bool key padding mask derived from the input
    mask: str | None = None  # "causal" (bool 2-D, with is_causal), "float3d" (per-sample float)
    need_weights: bool = False
    average: bool = True


CONFIGS = {
    "self": Cfg(),
    "seq_first": Cfg(batch_first=False),
    "cross_kv": Cfg(kind="kv", kpm=True),
    "cross_kdim_vdim": Cfg(kind="qkv", kdim=3, vdim=5, bias=False),
    "same_dim_qkv": Cfg(kind="qkv", mask="float3d", need_weights=True, average=False),
    "bias_kv_zero_attn": Cfg(add_bias_kv=True, add_zero_attn=True, kpm=True, mask="causal"),
    "causal_weights": Cfg(mask="causal", need_weights=True),
    "causal_kpm": Cfg(mask="causal", kpm=True, batch_first=False),
}


class AttnNet(nn.Module):
    def __init__(self, cfg: Cfg, d: int = 6, heads: int = 2) -> None:
        super().__init__()
        self.cfg, self.heads = cfg, heads
        self.q = nn.Linear(3, d)
        self.k = nn.Linear(3, cfg.kdim or d)
        self.v = nn.Linear(3, cfg.vdim or d)
        self.att = nn.MultiheadAttention(d, heads, bias=cfg.bias, add_bias_kv=cfg.add_bias_kv,
                                         add_zero_attn=cfg.add_zero_attn, kdim=cfg.kdim,
                                         vdim=cfg.vdim, batch_first=cfg.batch_first)
        self.out = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        t = x.shape[1]
        q = self.q(x)
        k = q if c.kind == "self" else self.k(x)
        v = k if c.kind in ("self", "kv") else self.v(x)
        kpm = None
        if c.kpm:
            kpm = x[..., 0] > 0.5
            kpm[:, 0] = False  # keep one key per sample (a fully masked row is NaN in torch)
        mask, causal = None, False
        if c.mask == "causal":
            mask, causal = torch.ones(t, t, dtype=torch.bool).triu(1), True
        elif c.mask == "float3d":
            mask = (x[..., 1:2] * x[..., 2].unsqueeze(1)).repeat_interleave(self.heads, 0)
        if not c.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if c.kind == "self":
                k = v = q
            elif c.kind == "kv":
                v = k
        o, w = self.att(q, k, v, key_padding_mask=kpm, attn_mask=mask,
                        need_weights=c.need_weights, average_attn_weights=c.average,
                        is_causal=causal)
        if not c.batch_first:
            o = o.transpose(0, 1)
        y = self.out(o).mean(1)
        if w is not None:
            y = y + w.square().flatten(1).sum(1, keepdim=True)
        return y


def _data(b: int = 4, t: int = 5) -> tuple[Tensor, Tensor]:
    return torch.rand(b, t, 3, dtype=DT), torch.randn(b, 2, dtype=DT)


def _case(name: str, seed: int) -> tuple[AttnNet, Tensor, Tensor]:
    """The float64 model of ``CONFIGS[name]`` and a batch (x, y), after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    cfg = CONFIGS[name]
    model = AttnNet(cfg).to(DT)
    if cfg.add_bias_kv:  # torch starts them at zero; random values make their gradients count
        nn.init.normal_(model.att.bias_k)
        nn.init.normal_(model.att.bias_v)
    return model, *_data()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_recorded_forward_equals_torch_forward(name: str) -> None:
    model, x, _ = _case(name, 0)
    ref = model(x)
    wanted = frozenset(id(p) for p in model.parameters())
    rec = Recorder(x.shape[0], wanted, clone=False, create_graph=False)
    with recording(model, rec):
        got = model(x)
    assert rec.uses, "the attention projections were recorded"
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert "forward" not in model.att.__dict__  # the override is removed on exit


@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_norms_match_naive_loop(name: str) -> None:
    model, x, y = _case(name, 1)
    assert_matches_naive(model, nn.MSELoss(), x, y)


def test_attention_in_train_mode_with_dropout_is_self_consistent() -> None:
    """With dropout the forward is random; the norms must still be those of the function that
    was evaluated: with p = 0 in train mode they equal the eval-mode norms exactly."""
    torch.manual_seed(2)
    model = AttnNet(Cfg()).to(DT)
    x, y = _data()
    model.eval()
    ref = per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    model.train()
    assert model.att.dropout == 0.0
    got = per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)
    model.att.dropout = 0.5
    noisy = per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    assert isinstance(noisy, Tensor) and bool(torch.isfinite(noisy).all())
    assert model.training and model.att.training  # flags untouched
