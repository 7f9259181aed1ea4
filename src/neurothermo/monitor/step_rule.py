"""The training step the monitor assumes: ``lr`` and weight decay from the optimizer's param groups
(or the plain-SGD ``lr`` / ``weight_decay`` arguments), and why charge predictions are not exact.
"""
from __future__ import annotations

import torch


def check_binding(optimizer: torch.optim.Optimizer | None, lr: float | None,
                  weight_decay: float | None) -> None:
    """Raise for an ``optimizer`` that is not one, or one given together with ``lr``/``weight_decay``."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if optimizer is not None and (lr is not None or weight_decay is not None):
        raise ValueError("give either optimizer= or lr=/weight_decay=, not both")


def step_rule(opt: torch.optim.Optimizer | None, lr_arg: float | None,
              wd_arg: float | None) -> tuple[float | None, float, str | None]:
    """(lr, weight decay, reason why charge predictions are not exact or None)."""
    if opt is None:
        if lr_arg is None:
            return None, 0.0, "no lr known (pass optimizer= or lr=)"
        return lr_arg, wd_arg or 0.0, None
    groups = opt.param_groups
    lr, wd = float(groups[0]["lr"]), float(groups[0].get("weight_decay", 0.0))
    if any(float(g["lr"]) != lr or float(g.get("weight_decay", 0.0)) != wd for g in groups):
        return lr, wd, "param groups differ in lr or weight_decay"
    if type(opt) is not torch.optim.SGD:
        return lr, wd, f"optimizer is {type(opt).__name__}, not plain SGD"
    g0 = groups[0]
    if g0.get("momentum", 0) or g0.get("nesterov") or g0.get("maximize"):
        return lr, wd, "SGD with momentum (or nesterov/maximize) is not plain SGD"
    return lr, wd, None
