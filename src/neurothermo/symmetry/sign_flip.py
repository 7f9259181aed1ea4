"""Sign-flip symmetry: hidden units behind odd activations (tanh, sin, softsign, …).

``σ(−z) = −σ(z)``: flipping the sign of a unit's in-weights, bias and out-weights leaves the function
unchanged. A discrete isometry of parameter space: no charge, never broken by SGD (docs/theory.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.symmetry.base import Symmetry, check_units_vector, register_kind


@dataclass(frozen=True)
class SignFlipKind:
    name: str = "sign_flip"
    isometry: bool = True
    element_help: str = "±1 per unit"

    def check_element(self, sym: Symmetry, element: Tensor) -> Tensor:
        return check_units_vector(sym, element, "+1 or -1 for every unit", lambda e: e.abs() == 1)

    def random_element(
        self, sym: Symmetry, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        signs = torch.randint(0, 2, (sym.n_units,), generator=generator) * 2 - 1
        signs[torch.randint(0, sym.n_units, (1,), generator=generator)] = -1  # never the identity
        return signs.to(dtype=dtype, device=device)

    def act(self, sym: Symmetry, element: Tensor, role: str, m: Tensor) -> Tensor:
        return m if role == "passive" else m * element.to(m.dtype)[:, None]


SIGN_FLIP = register_kind(SignFlipKind())
