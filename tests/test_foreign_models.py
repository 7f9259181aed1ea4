"""The foreign-model zoo is what it claims to be: the layouts of torchvision and timm (checked by
their published parameter counts) and working HF models, each trainable with its loss."""
from __future__ import annotations

import pytest
import torch

from foreign_models import (
    CASE_IDS,
    CASES,
    ForeignCase,
    VisionTransformer,
    resnet18,
    skip_unavailable,
)


def test_resnet18_has_torchvisions_parameter_count() -> None:
    # torchvision.models.resnet18() has 11,689,512 parameters (1000 classes, width 64).
    assert sum(p.numel() for p in resnet18(1000, 64).parameters()) == 11_689_512


def test_vit_has_timms_parameter_count() -> None:
    # timm's vit_tiny_patch16_224 (dim 192, depth 12, 3 heads) has 5,717,416 parameters.
    m = VisionTransformer(224, 16, 3, 1000, 192, 12, 3)
    assert sum(p.numel() for p in m.parameters()) == 5_717_416


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_trains(case: ForeignCase) -> None:
    skip_unavailable(case)
    model = case.model()
    x, y = case.data(4)
    loss = case.loss_fn(case.forward(model, x), y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
