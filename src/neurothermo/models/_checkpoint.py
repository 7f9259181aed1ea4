"""Loading a shipped ImageNet checkpoint into a model written to match its state dict."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def eval_with_weights(model: M, checkpoint: Callable[[], Path] | None) -> M:
    """``model`` in eval mode; first, when ``checkpoint`` is given, the state dict at the path it
    returns is loaded with ``strict=True`` (on the CPU, ``weights_only=True``)."""
    if checkpoint is not None:
        state = torch.load(checkpoint(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
