"""per_sample_grad_norms on the foreign-model zoo against the per-sample loop, float64.

Every model of ``tests/foreign_models.py`` (torchvision-layout ResNet-18 in eval mode, timm-layout
ViT with model-level ``cls_token`` / ``pos_embed``, Hugging Face BERT with padded attention masks
and GPT-2 with ``Conv1D`` projections, broadcast ``position_ids`` and tied ``wte`` / ``lm_head``,
LSTM, GRU, GroupNorm CNN, tied LM, Hugging Face Llama with GQA and RMSNorm) on every device of
``devices()``. Both sides are exact, so the tolerance is the float64 rounding one of
``_helpers.RTOL``, raised to the case's ``floor`` for a model that computes in float32 inside
(Llama's RMSNorm and rotary). No model may go through the whole-model torch.func fallback (a
:class:`FallbackWarning` fails the test).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from _helpers import DT, RTOL, assert_matches_naive
from foreign_models import (
    CASES,
    HAS_TRANSFORMERS,
    ForeignCase,
    TokensOnly,
    devices,
    skip_unavailable,
)
from neurothermo.gradstats import FallbackWarning

# An encoder–decoder's two token streams of different lengths do not fit TokensOnly's one tensor;
# test_foreign_api checks T5 against the per-sample loop with its dict inputs.
ONE_TENSOR = [c for c in CASES if "seq2seq" not in c.tags]


def model_and_batch(c: ForeignCase, device: str, b: int = 5) -> tuple[nn.Module, Tensor, Tensor]:
    model = c.model(device=device, dtype=DT).eval()  # eval: BatchNorm uses running statistics
    for m in model.modules():  # cuDNN runs an RNN backward in train mode only (no dropout here)
        if isinstance(m, nn.RNNBase):
            m.train()
    inputs, y = c.data(b, device=device, dtype=DT)
    if isinstance(inputs, dict):
        model = TokensOnly(model)
        x = (torch.stack([inputs["input_ids"], inputs["attention_mask"]], 1)
             if "attention_mask" in inputs else inputs["input_ids"])
        return model, x, y
    return model, inputs, y


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("c", ONE_TENSOR, ids=[c.name for c in ONE_TENSOR])
def test_zoo_matches_the_per_sample_loop_without_fallback(c: ForeignCase, device: str) -> None:
    skip_unavailable(c)
    model, x, y = model_and_batch(c, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(model, c.loss_fn, x, y, rtol=max(RTOL, c.floor))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (dev extra)")
def test_hf_conv1d_rule_on_flat_and_sequence_inputs_and_not_on_a_changed_subclass() -> None:
    from transformers.pytorch_utils import Conv1D

    from neurothermo.gradstats.rules import rule_for

    class Doubled(Conv1D):  # computes something else: must not get Conv1D's closed form
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    torch.manual_seed(0)
    assert rule_for(Conv1D(3, 4)) is not None and rule_for(Doubled(3, 4)) is None
    flat = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(2, 6)).to(DT)
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(flat, nn.MSELoss(), x, y)
        seq = nn.Sequential(Conv1D(6, 4), nn.GELU(), Conv1D(2, 6)).to(DT)
        assert_matches_naive(seq, nn.MSELoss(), torch.randn(5, 7, 4, dtype=DT),
                             torch.randn(5, 7, 2, dtype=DT))
