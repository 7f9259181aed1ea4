"""Conditions of a second-order measurement: the model's mode (train-mode BatchNorm on batch
statistics, running statistics untouched), fixed dropout masks, and microbatches weighted by size.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from neurothermo._data import Batch, Data
from neurothermo._state import check_mode, double_backward_attention, preserved_state
from neurothermo._types import Mode


def microbatches(data: Data, microbatch_size: int | None) -> list[tuple[Batch, float]]:
    """Cut batches into microbatches; each comes with its weight ``b_m / N`` (weights sum to 1)."""
    chunks = list(data.chunks(microbatch_size))
    n_total = sum(c.size for c in chunks)
    return [(c, c.size / n_total) for c in chunks]


def _disable_bn_tracking(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Make train-mode BatchNorm use batch statistics without touching its running statistics."""
    changed: list[nn.modules.batchnorm._BatchNorm] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            m.track_running_stats = False
            changed.append(m)
    return changed


@contextmanager
def measurement_mode(model: nn.Module, mode: Mode) -> Iterator[nn.Module]:
    """Put ``model`` in ``mode`` (None: as it is, "eval" or "train") for a second-order
    measurement, with double-differentiable attention kernels; restore everything after."""
    check_mode(mode)
    with preserved_state(model, mode), torch.enable_grad(), double_backward_attention():
        changed = _disable_bn_tracking(model)
        try:
            yield model
        finally:
            for m in changed:
                m.track_running_stats = True


def _fixed_rng(device: torch.device, seed: int) -> AbstractContextManager[Any]:
    """Fork the RNG (CPU and the model's accelerator) and seed it: same dropout masks every call."""
    devices = [device.index or 0] if device.type == "cuda" else []

    @contextmanager
    def ctx() -> Iterator[None]:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return ctx()
