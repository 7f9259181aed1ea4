"""Models the benchmark scripts share (imported as ``_common``: the scripts run from this folder)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class Case:
    """One benchmark case: a model, its loss and one batch."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    x: Tensor
    y: Tensor


def mnist_mlp() -> nn.Sequential:
    """MLP 784-512-512-10 with ReLU (float32, freshly initialised from torch's global RNG)."""
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def mnist_cnn() -> nn.Sequential:
    """Small CNN on 1×28×28: two 3×3 conv (16, 32 channels) + ReLU + 2×2 max-pool, then a linear
    layer to 10 classes."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 10))
