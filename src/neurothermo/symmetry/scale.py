"""Scale symmetry: parameters whose scale a normalisation removes.

``f(s·w) = f(w)`` for ``s > 0``: a linear map followed by LayerNorm over its whole output (``W`` and
``b`` jointly, one scalar), by BatchNorm in train mode (per channel: row ``c`` of the weight and
bias ``c``), by GroupNorm (one scale per group of consecutive channels), or weight normalisation
``w = g·v/‖v‖`` (``v`` per normalised slice). The generator is positive definite, so the charge
has no balance point: gradient noise only makes it grow::

    J = ‖w‖²,   SGD: J' = (1 − lr·wd)²·J + lr²·‖g‖²   (grows forever when wd = 0)

Normalisations with ``eps > 0`` are scale invariant only up to ``O(eps/σ²)``: :func:`find_symmetries`
reports such a symmetry as approximate (``exact=False``) with its measured breaking when it is
exact as ``eps → 0`` (see ``checking.py`` and docs/symmetries.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo.symmetry.base import ParamSlice, Symmetry, register_kind
from neurothermo.symmetry.rescale import act_by_scales, check_unit_scales


@dataclass(frozen=True)
class ScaleKind:
    name: str = "scale"
    isometry: bool = False
    element_help: str = "a positive scale (per unit, or one scalar for a whole scale)"

    def check_element(self, sym: Symmetry, element: Tensor) -> Tensor:
        if sym.whole:
            if element.numel() != 1 or not bool(torch.isfinite(element).all() & (element > 0).all()):
                raise ValueError("whole-scale element must be one finite scalar > 0")
            return element.reshape(1)
        return check_unit_scales(sym, element)

    def random_element(
        self, sym: Symmetry, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        n = 1 if sym.whole else sym.n_units
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        e = torch.exp(2.0 * u - 1.0).to(dtype=dtype, device=device)
        return e[0] if sym.whole else e

    def act(self, sym: Symmetry, element: Tensor, role: str, m: Tensor) -> Tensor:
        return act_by_scales(element, role, m)


SCALE = register_kind(ScaleKind())


@dataclass(frozen=True)
class WeightNormInfo:
    """Where a module's weight normalisation keeps ``g`` and ``v`` (parameter name suffixes)."""

    g: str
    v: str
    dim: int | None  # normalised per slice along ``dim``; None: one norm for the whole tensor


def weight_norm_info(module: nn.Module, name: str = "weight") -> WeightNormInfo | str | None:
    """Weight-norm layout of ``module.<name>``; ``None`` if plain; a reason string if unsupported."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]  # type: ignore[index]
        if len(plist) != 1 or type(plist[0]).__name__ != "_WeightNorm":
            kinds = ", ".join(type(p).__name__ for p in plist)
            return f"'{name}' is parametrized by {kinds}, whose effect on the symmetry is unknown"
        wn: Any = plist[0]
        d = int(wn.dim)
        return WeightNormInfo(
            f"parametrizations.{name}.original0", f"parametrizations.{name}.original1",
            None if d == -1 else d,
        )
    hook: Any
    for hook in module._forward_pre_hooks.values():
        if type(hook).__name__ == "WeightNorm" and getattr(hook, "name", None) == name:
            d = int(hook.dim)
            return WeightNormInfo(f"{name}_g", f"{name}_v", None if d == -1 else d)
    return None


def weight_norm_symmetry(path: str, module: nn.Module) -> Symmetry | None:
    """The scale symmetry of ``v`` in ``w = g·v/‖v‖`` (per normalised slice), if weight-normed."""
    info = weight_norm_info(module)
    if not isinstance(info, WeightNormInfo):
        return None
    prefix = f"{path}." if path else ""
    v = module.get_parameter(info.v)
    if info.dim is None:
        return Symmetry(
            "scale", f"{path or 'model'} (weight norm: v, whole tensor)",
            (ParamSlice(prefix + info.v, "in", None),), 1, whole=True,
        )
    d = info.dim % v.ndim
    n = v.shape[d]
    return Symmetry(
        "scale", f"{path or 'model'} (weight norm: v per slice along dim {d}, {n} units)",
        (ParamSlice(prefix + info.v, "in", d),), n,
    )
