"""Multi-layer perceptrons as plain ``nn.Sequential`` (traceable, symmetry-detectable)."""
from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def mlp(sizes: Sequence[int], activation: str = "relu", *, bias: bool = True) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) → act → … → Linear(sizes[-2], sizes[-1])`` (no final activation).

    The Linear layers are named ``0, 2, 4, …`` as in any ``nn.Sequential``.

    Args:
        sizes: the widths ``(d_in, h_1, …, d_out)``, at least two, each ≥ 1.
        activation: ``"relu"``, ``"leaky_relu"``, ``"tanh"``, ``"gelu"`` or ``"identity"``.
        bias: give every Linear layer a bias.

    Returns:
        The ``nn.Sequential`` (torch's default initialisation).

    Raises:
        ValueError: fewer than two sizes, a size < 1, or an unknown ``activation``.

    Example:
        >>> from neurothermo.models import mlp
        >>> mlp([4, 8, 3], "tanh")
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=True)
          (1): Tanh()
          (2): Linear(in_features=8, out_features=3, bias=True)
        )
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least 2 positive widths, got {list(sizes)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(int(a), int(b), bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
