"""Transfer rules for reductions: ``mean`` / ``sum`` and ``torch.linalg.vector_norm`` (used by
``flow.py``), as in ConvNeXt-V2's global response normalisation (GRN)::

    g = vector_norm(x, dim=(H, W), keepdim=True)        # per channel, over positions
    x' = gamma * (x * g / (g.mean(dim=C) + 1e-6)) + beta + x

* Over axes other than the units' (``g`` above): each unit is reduced on its own, so the units
  stay on their axis (shifted when ``keepdim`` is False). ``mean`` / ``sum`` are linear (every
  group class passes); a ``p``-norm (``p ≠ 0``) is positively homogeneous and even
  (``‖a·x‖ = a·‖x‖`` for ``a > 0``; ``‖−x‖ = ‖x‖``): rescale and permutation pass, sign flips and
  rotations do not; ``p = 0`` (a count) only commutes with permutations.
* Over the units' axis (``g.mean(dim=C)``): the result is the same number for any order of the
  units, so it no longer carries them (the walk stops following it, it does not transform) — but
  only permutations (and, for a norm, sign flips) leave it unchanged: a rescale of the units
  changes it. The flow keeps only those classes. GRN is therefore permutation-equivariant over
  the channels (``gamma`` and ``beta`` permuted along) but not rescale-equivariant.
* Over part of the units' axes (one of the two axes of attention heads): blocked.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.fx as fx

from neurothermo.symmetry.trace import Traced
from neurothermo.symmetry.units import _ELEM, _HOMOG, ALL, Blocked, Flow, Track, label, ndim_of

_DIM_AT = {"mean": 1, "sum": 1, "vector_norm": 2}


def _arg(node: fx.Node, i: int, key: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def reduce_step(tr: Traced, flow: Flow, node: fx.Node, op: str, t: Track) -> Track | None:
    """The units' track after the reduction ``node`` (None: reduced over the units)."""
    nd = ndim_of(tr, node.args[0])
    lbl = label(node)
    i = _DIM_AT[op]
    dim: Any = _arg(node, i, "dim", None)
    keep: Any = _arg(node, i + 1, "keepdim", False)
    if t.pick is not None or t.seg is not None or t.copy_axis is not None or t.head is not None:
        raise Blocked(f"'{lbl}' reduces a tensor whose units are segments or a tuple")
    if dim is None or dim == []:
        dims = set(range(nd))
    elif isinstance(dim, int):
        dims = {dim % nd}
    elif isinstance(dim, tuple | list) and all(isinstance(d, int) for d in dim):
        dims = {d % nd for d in dim}
    else:
        raise Blocked(f"'{lbl}' reduces over axes that are not known")
    if not isinstance(keep, bool):
        raise Blocked(f"'{lbl}' with an unknown keepdim")
    order: Any = _arg(node, 1, "ord", 2) if op == "vector_norm" else None
    if op == "vector_norm" and not isinstance(order, int | float):
        raise Blocked(f"'{lbl}' with an unknown order")
    hit = dims & set(t.axes)
    if hit and hit != set(t.axes):
        raise Blocked(f"'{lbl}' reduces over part of the units' axes")
    if hit:
        allowed = frozenset({"perm", "sign"}) if op == "vector_norm" and order != 0 else _ELEM
        flow.restrict(allowed, f"'{lbl}' reduces over the units: only a permutation"
                      + (" or sign flip" if len(allowed) > 1 else "") + " leaves it unchanged")
        flow.path.append(lbl)
        return None
    if t.repeat != 1:
        raise Blocked(f"'{lbl}' reduces a tensor whose units are flattened with other axes")
    if op == "vector_norm":
        if len(t.axes) != 1:
            raise Blocked(f"'{lbl}': a norm over attention heads")
        allowed = _HOMOG if order != 0 else _ELEM
        flow.linear = False
        flow.restrict(allowed, f"'{lbl}' is only " + ("positively homogeneous" if order != 0
                                                      else "elementwise"))
    else:
        allowed = ALL
    flow.path.append(lbl)
    if keep:
        return t
    return replace(t, axes=tuple(a - sum(1 for d in dims if d < a) for a in t.axes))
