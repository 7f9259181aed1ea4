"""Hugging Face's RMSNorm layers get a closed-form per-sample rule (no torch.func fallback).

Reference: the per-sample loop (one backward per sample) through the same layer. The layers
compute ``x̂`` in float32 even in a float64 model; the rule reproduces that, so in float64 the
two sides differ only by the order of a sum (RTOL 1e-10, ``_helpers``). The control shows the
tolerance can fail: ``x̂`` computed in float64 (what ``F.rms_norm`` would give) misses by the
float32 round-off of ``x̂``, about 1e-8 relative, far outside it.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import RTOL, naive_sq_norms
from neurothermo.gradstats import per_sample_grad_norms
from neurothermo.gradstats.rules import FallbackWarning, rule_for

transformers = pytest.importorskip("transformers")

DT = torch.float64


def _norm_classes() -> dict[str, type[nn.Module]]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return {"llama": LlamaRMSNorm, "mistral": MistralRMSNorm, "qwen2": Qwen2RMSNorm,
            "t5": T5LayerNorm, "olmo2": Olmo2RMSNorm}


class Net(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.norm = norm
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x)))).mean(1)


def _net(cls: type[nn.Module], dtype: torch.dtype = DT) -> Net:
    torch.manual_seed(0)
    norm = cls(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(6))  # away from the all-ones init
    return Net(norm).to(dtype)


def _data(dtype: torch.dtype = DT):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(5, 7, 4, generator=g).to(dtype) * 3,
            torch.randn(5, 3, generator=g).to(dtype))


F32 = 1e-6  # parameters upstream of the layer get δ through its float32 backward: the batch and
# the one-sample loop may round it differently (7e-8 observed, float32 eps 1.2e-7)


def _check(model: Net, x: torch.Tensor, y: torch.Tensor) -> None:
    """The layer's own weight to RTOL (float64 on both sides of the rule), the rest to F32."""
    got = per_sample_grad_norms(model, nn.MSELoss(), (x, y), by_parameter=True)
    ref = naive_sq_norms(model, nn.MSELoss(), x, y)
    for n in ref:
        tol = RTOL if n.startswith(("norm.", "out.")) else F32
        torch.testing.assert_close(got[n], ref[n], rtol=tol, atol=0, msg=n)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "t5", "olmo2"])
def test_rule_matches_the_per_sample_loop_without_fallback(kind: str) -> None:
    model = _net(_norm_classes()[kind])
    assert rule_for(model.norm) is not None
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        _check(model, x, y)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_rule_in_float32_matches_the_loop_to_float32_round_off(kind: str) -> None:
    """float32: both sides round at ~6e-8 per operation; sums over 7 positions and 6 features
    stay well inside 1e-5."""
    model = _net(_norm_classes()[kind], torch.float32)
    x, y = _data(torch.float32)
    got = per_sample_grad_norms(model, nn.MSELoss(), (x, y), by_parameter=True)
    ref = naive_sq_norms(model, nn.MSELoss(), x, y)
    torch.testing.assert_close(got["norm.weight"], ref["norm.weight"], rtol=1e-5, atol=0)


def test_control_xhat_in_float64_misses_the_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 upcast matters: with ``x̂`` from ``F.rms_norm`` in float64 the layer's weight
    misses RTOL (by the float32 round-off of ``x̂``), so the tolerance above can fail."""
    from neurothermo.gradstats.rules import hf_rms_norm

    monkeypatch.setattr(hf_rms_norm, "_xhat", lambda m, form, x: F.rms_norm(
        x, (x.shape[-1],), eps=m.variance_epsilon))
    model = _net(_norm_classes()["llama"])
    x, y = _data()
    with pytest.raises(AssertionError, match="norm.weight"):
        _check(model, x, y)


def test_other_forms_are_not_matched_and_stay_exact() -> None:
    """Gemma's ``(1 + w) ⊙ x̂`` and a subclass with its own forward are not this rule's form:
    they take the fallback (a warning) and remain exact (to F32: Gemma multiplies by its weight
    in float32, and the fallback runs it one sample at a time)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Shifted(LlamaRMSNorm):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return (self.weight + 1) * F.rms_norm(hidden_states, (6,), eps=1e-5)

    for cls in (GemmaRMSNorm, Shifted):
        model = _net(cls)
        assert rule_for(model.norm) is None
        x, y = _data()
        with pytest.warns(FallbackWarning):
            got = per_sample_grad_norms(model, nn.MSELoss(), (x, y), by_parameter=True)
        ref = naive_sq_norms(model, nn.MSELoss(), x, y)
        torch.testing.assert_close(got["norm.weight"], ref["norm.weight"], rtol=F32, atol=0)


def test_tiny_llama_has_no_fallback_and_matches_the_loop() -> None:
    """A whole Llama (GQA, rotary, SwiGLU, RMSNorm) at one-backward cost. Tolerance 1e-6: the
    model computes RMSNorm and rotary in float32, and the loop runs it on one sample at a time,
    whose float32 kernels may round differently from the batch's (~1e-8 observed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(DT).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (3, 6), generator=g)
    tgt = torch.randint(0, 40, (3, 6), generator=g)

    def ce(out, t):
        return F.cross_entropy(out.logits.reshape(-1, 40), t.reshape(-1))

    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = per_sample_grad_norms(model, ce, (ids, tgt))
    params = [p for p in model.parameters() if p.requires_grad]
    ref = []
    for i in range(3):
        gs = torch.autograd.grad(ce(model(ids[i:i + 1]), tgt[i:i + 1]), params)
        ref.append(sum(t.square().sum() for t in gs))
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-6, atol=0)
