"""Rescale symmetry: hidden unit ``i`` between positively homogeneous activations.

``σ(s·z) = s·σ(z)`` for ``s > 0`` (ReLU, leaky ReLU, PReLU with a shared or per-channel slope,
max-pooling, the identity). Scaling the unit's in-weights and bias by ``s_i`` and its out-weights
by ``1/s_i`` leaves the function unchanged. Charge per unit (docs/theory.md §2, table)::

    J_i = ‖w_i‖² + b_i² − ‖u_i‖²,    SGD: J_i' = (1 − lr·wd)²·J_i + lr²·(‖g_wi‖² + g_bi² − ‖g_ui‖²)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.symmetry.base import Symmetry, check_units_vector, register_kind


def check_unit_scales(sym: Symmetry, element: Tensor) -> Tensor:
    """A vector of finite positive scales, one per unit (shared by the rescale and scale kinds)."""
    return check_units_vector(
        sym, element, "finite and > 0 (one scale per unit)",
        lambda e: torch.isfinite(e) & (e > 0),
    )


def act_by_scales(element: Tensor, role: str, m: Tensor) -> Tensor:
    """Multiply rows of an ``"in"`` slice by the unit scales, divide ``"out"`` slices by them."""
    s = element.to(m.dtype)[:, None]
    if role == "in":
        return m * s
    if role == "out":
        return m / s
    return m


@dataclass(frozen=True)
class RescaleKind:
    name: str = "rescale"
    isometry: bool = False
    element_help: str = "positive scales, one per unit"

    def check_element(self, sym: Symmetry, element: Tensor) -> Tensor:
        return check_unit_scales(sym, element)

    def random_element(
        self, sym: Symmetry, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        # log-uniform scales in [1/e, e]
        u = torch.rand(sym.n_units, generator=generator, dtype=torch.float64)
        return torch.exp(2.0 * u - 1.0).to(dtype=dtype, device=device)

    def act(self, sym: Symmetry, element: Tensor, role: str, m: Tensor) -> Tensor:
        return act_by_scales(element, role, m)


RESCALE = register_kind(RescaleKind())
