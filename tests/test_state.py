"""preserved_state: buffers, train flags and the caller's .grad come back exactly, also on error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from neurothermo._state import preserved_state


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()


def test_backward_inside_the_block_never_reaches_the_callers_grad() -> None:
    model = _model()
    x = torch.randn(6, 3, dtype=torch.float64)
    model(x).sum().backward()
    before = {n: p.grad for n, p in model.named_parameters()}
    values = {n: g.clone() for n, g in before.items()}
    stats = model[1].running_mean.clone()
    with preserved_state(model, mode="eval"):
        assert all(p.grad is None for p in model.parameters())  # set aside, not shared
        assert not model.training
        (3 * model(x).sum()).backward()  # would accumulate into the caller's tensors otherwise
    for n, p in model.named_parameters():
        assert p.grad is before[n] and torch.equal(p.grad, values[n])
    assert model.training and torch.equal(model[1].running_mean, stats)


def test_restored_on_error_including_buffers_changed_in_train_mode() -> None:
    model = _model()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    g = model[0].weight.grad
    stats = model[1].running_var.clone()

    def fail() -> None:
        with preserved_state(model, mode="train"):
            model(torch.randn(5, 3, dtype=torch.float64))  # updates the running statistics
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert model[0].weight.grad is g and model[2].weight.grad is None
    assert torch.equal(model[1].running_var, stats)
    with pytest.raises(ValueError, match="mode must be"), preserved_state(model, mode="test"):
        pass
