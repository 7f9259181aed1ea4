"""Permutation symmetry: hidden units between elementwise activations.

Permuting the units (in-weights rows, biases, per-unit activation/normalisation parameters and
running statistics, out-weight columns) leaves the function unchanged. A discrete isometry: no
charge, never broken by SGD (docs/theory.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.symmetry.base import Symmetry, register_kind


@dataclass(frozen=True)
class PermutationKind:
    name: str = "permutation"
    isometry: bool = True
    element_help: str = "a permutation of range(n_units)"

    def check_element(self, sym: Symmetry, element: Tensor) -> Tensor:
        if element.shape != (sym.n_units,) or element.is_floating_point() or element.is_complex():
            raise ValueError(
                f"permutation element must be an integer tensor of shape ({sym.n_units},), got "
                f"{element.dtype} {tuple(element.shape)}"
            )
        ref = torch.arange(sym.n_units, device=element.device)
        if not bool((element.sort().values == ref).all()):
            raise ValueError(f"permutation element is not a permutation of range({sym.n_units})")
        return element.long()

    def random_element(
        self, sym: Symmetry, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        perm = torch.randperm(sym.n_units, generator=generator)
        if sym.n_units > 1 and bool((perm == torch.arange(sym.n_units)).all()):
            perm = perm.roll(1)  # never the identity
        return perm.to(device)

    def act(self, sym: Symmetry, element: Tensor, role: str, m: Tensor) -> Tensor:
        return m[element]


PERMUTATION = register_kind(PermutationKind())
