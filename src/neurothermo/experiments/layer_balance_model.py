"""The models of ``layer-balance``: MLPs of positively homogeneous units, rescaled off balance."""
from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn


class Abs(nn.Module):
    """``|x|`` elementwise: positively homogeneous (|a·x| = a·|x| for a > 0), slope ±1 everywhere."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.abs(x)


ACTIVATION_FORMS = "'relu', 'leaky_relu:<slope>' with 0 <= slope < 1, or 'abs'"


def make_activation(spec: str) -> nn.Module:
    """The activation module named by ``spec``: ``relu``, ``leaky_relu:<slope>`` or ``abs``.

    Raises:
        ValueError: any other name, or a leaky slope outside [0, 1).
    """
    name, _, arg = spec.partition(":")
    if name == "relu" and not arg:
        return nn.ReLU()
    if name == "abs" and not arg:
        return Abs()
    if name == "leaky_relu":
        try:
            slope = float(arg)
        except ValueError:
            slope = float("nan")
        if 0.0 <= slope < 1.0:
            return nn.LeakyReLU(slope)
    raise ValueError(f"activation {spec!r} is not one of {ACTIVATION_FORMS}")


def build_model(widths: list[int], bias: bool, scale: float, seed: int, activation: str = "relu"
                ) -> nn.Sequential:
    """torch's default init (seeded) in float64, then every hidden unit rescaled by ``scale``.

    A plain ``nn.Sequential`` of ``nn.Linear`` and the activation (:func:`make_activation`; the
    initial weights do not depend on it): consecutive Linear layers a, b get
    ``a.weight, a.bias × s`` and ``b.weight ÷ s`` — the function is unchanged (the activation is
    positively homogeneous), every hidden activation is × s, and each pair's in/out energy ratio × 1/s².
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(make_activation(activation))
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    for m in model:  # re-initialise after seeding, in order, as nn.Linear does
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    model = model.double()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for la, lb in pairwise(linears):
            la.weight.mul_(scale)
            if la.bias is not None:
                la.bias.mul_(scale)
            lb.weight.div_(scale)
    return model


def activity(model: nn.Sequential, x: Tensor) -> list[float]:
    """Fraction of (sample, unit) pairs with a positive pre-activation, per hidden layer (for ReLU
    the units that pass gradient; leaky ReLU and |x| pass it everywhere, with slope s or −1 below 0)."""
    out, h = [], x
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.ReLU | nn.LeakyReLU | Abs):
                out.append(float((h > 0).double().mean()))
            h = m(h)
    return out


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of samples whose largest output is their (clean) label: does the run learn?"""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())
