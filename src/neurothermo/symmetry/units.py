"""Units of a layer and the flow record of where they go (used by ``flow.py`` and ``ops.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from neurothermo.symmetry.base import ParamSlice
from neurothermo.symmetry.scale import WeightNormInfo, weight_norm_info
from neurothermo.symmetry.trace import Traced, op_name

ALL = frozenset({"gl", "rescale", "sign", "perm"})
_HOMOG = frozenset({"rescale", "perm"})
_ODD = frozenset({"sign", "perm"})
_ELEM = frozenset({"perm"})
_DIAG = frozenset({"rescale", "sign", "perm"})
_SCALES = frozenset({"rescale", "sign"})
_LINEAR = {"identity", "neg", "avg_pool"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.RMSNorm)


class Blocked(Exception):
    """The units cannot pass this operation."""


class Fused(Exception):
    """The layer's units are split into ``count`` segments (a fused q/k/v projection): detection
    restarts with one producer per segment; ``sizes``: the segments' sizes when they differ."""

    def __init__(self, count: int, sizes: tuple[int, ...] | None = None) -> None:
        super().__init__(f"units split into {count} segments")
        self.count = count
        self.sizes = sizes


@dataclass(frozen=True)
class Track:
    """Where the units sit: ``(axis,)`` or ``(head_axis, inner_axis)``; ``repeat`` consecutive
    features per unit along the axis (after flattening ``C×H×W``); ``normed``: after a norm."""

    axes: tuple[int, ...]
    repeat: int = 1
    normed: bool = False
    seg: tuple[int, int] | None = None  # (k, count): segment k of a fused unit axis is ours
    seg_axis: int | None = None  # after a reshape: the axis indexing the segments
    pick: int | None = None  # the node is a tuple; element ``pick`` holds the units
    strict: bool = False  # with ``pick``: using another element of the tuple blocks the flow
    copies: int = 1  # with ``seg``: entries per segment, each a copy of the units (shared heads)
    copy_axis: int | None = None  # after ``expand``: the axis of copies, next merged into seg_axis
    head: tuple[int, int, int] | None = None  # (axis, h, heads): ``seg`` is within head h only
    merged: int = 0  # > 0: the heads axis holds batch × heads, head = index mod ``merged``
    uneven: tuple[int, ...] | None = None  # with ``seg``: the sizes of segments that differ


@dataclass
class Producer:
    node: fx.Node
    name: str
    n: int
    track: Track
    cov: list[ParamSlice]
    diag: bool = False
    problem: str | None = None
    caveat: str | None = None  # weight-normalised producer: diagonal groups only
    allowed: frozenset[str] | None = None  # group classes the producer itself admits
    sign_cov: list[ParamSlice] | None = None  # what a sign flip acts on, if not ``cov`` (RNN gates)


@dataclass(frozen=True)
class Gate:
    """Where the units were multiplied elementwise by another stream (a gated unit, see
    ``gated.py``): the ``mul`` node, which operand the units were, their track there, whether
    the path to it was linear and whether it admitted permutations."""

    node: fx.Node
    operand: int
    track: Track
    linear: bool
    perm: bool


@dataclass
class Flow:
    producer: Producer
    classes: set[str] = field(default_factory=lambda: set(ALL))
    lost: dict[str, str] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)
    cov: list[ParamSlice] = field(default_factory=list)
    passive: list[ParamSlice] = field(default_factory=list)
    consumers: list[tuple[str, list[ParamSlice], bool]] = field(default_factory=list)
    norms: list[tuple[str, str, bool]] = field(default_factory=list)  # name, channel|whole, ok
    bilinear: list[tuple[object, str]] = field(default_factory=list)  # (node[, head], A|B)
    blockers: list[str] = field(default_factory=list)
    eval_norms: list[tuple[str, str]] = field(default_factory=list)
    block: int = 0
    linear: bool = True  # no nonlinear operation on the path
    groups: int = 0  # GroupNorm: number of channel groups normalised together
    blocked_normed: bool = False  # the blocker met the units after a normalisation
    fused: int = 0  # > 0: the units are split into this many segments (see ``Fused``)
    sizes: tuple[int, ...] | None = None  # with ``fused``: the segments' sizes when they differ
    gate: Gate | None = None  # the units were gated by another stream (``gated.py``)
    joint: set[str] = field(default_factory=set)  # after ``gate``: classes left to both streams
    reached: set[fx.Node] = field(default_factory=set)  # the producer and every node stepped on

    def restrict(self, allowed: frozenset[str], reason: str) -> None:
        for c in self.classes - allowed:
            self.lost.setdefault(c, reason)
        self.classes &= allowed
        self.joint &= allowed


def unit_slice(name: str, role: str, dim: int, shape: tuple[int, ...], n: int, repeat: int,
           buffer: bool = False) -> ParamSlice:
    """A slice whose axis ``dim`` holds ``n·repeat`` features, ``repeat`` per unit."""
    if repeat == 1:
        return ParamSlice(name, role, dim, buffer=buffer)
    view = (*shape[:dim], n, repeat, *shape[dim + 1:])
    return ParamSlice(name, role, dim, view=view, buffer=buffer)


def weight_slices(tr: Traced, path: str, mod: nn.Module, role: str) -> tuple[list[ParamSlice], str]:
    """Weight rows (``in``, dim 0) or columns (``out``, dim 1) of a Linear/Conv, and a caveat."""
    info = weight_norm_info(mod)
    p = f"{path}." if path else ""
    if isinstance(info, str):
        raise Blocked(f"'{path}': {info}")
    if isinstance(info, WeightNormInfo):
        if role == "in":
            if info.dim != 0:
                raise Blocked(f"'{path}' is weight-normalised over dim {info.dim}: rows cannot "
                              "be scaled separately")
            return [ParamSlice(p + info.g, "in", 0), ParamSlice(p + info.v, "passive", 0)], \
                f"'{path}' is weight-normalised"
        return [ParamSlice(p + info.v, "out", 1)], f"'{path}' is weight-normalised"
    return [ParamSlice(p + "weight", role, 0 if role == "in" else 1)], ""



def flat_args(node: fx.Node) -> list[Any]:
    flat: list[Any] = []

    def rec(a: Any) -> None:
        if isinstance(a, list | tuple):
            for x in a:
                rec(x)
        elif isinstance(a, dict):
            for x in a.values():
                rec(x)
        else:
            flat.append(a)

    rec(node.args)
    rec(node.kwargs)
    return flat



_CLAMP_BOUNDS = {"clamp": ("min", "max"), "clamp_min": ("min",), "clamp_max": ("max",)}


def clamp_op(node: fx.Node, op: str) -> str:
    """What a ``clamp`` is as an activation: ``clamp(min=0)`` (ReLU) and ``clamp(max=0)`` are
    positively homogeneous (``max(α·z, 0) = α·max(z, 0)`` for ``α > 0``), ``clamp(−c, c)`` is
    odd (a hardtanh), other constant bounds are merely elementwise (``"relu6"``); bounds that are
    tensors block the units."""
    bounds: dict[str, Any] = {
        k: node.args[i + 1] if len(node.args) > i + 1 else node.kwargs.get(k)
        for i, k in enumerate(_CLAMP_BOUNDS[op])}
    lo, hi = bounds.get("min"), bounds.get("max")
    if any(v is not None and not isinstance(v, int | float) for v in (lo, hi)):
        raise Blocked(f"'{label(node)}' clamps the units to bounds that are tensors")
    if (lo == 0 and hi is None) or (lo is None and hi == 0):
        return "relu"
    if lo is not None and hi is not None and lo == -hi and hi > 0:
        return "hardtanh"
    return "relu6"


def label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else (op_name(node) or node.name)


def ndim_of(tr: Traced, node: Any) -> int:
    s = tr.shape(node)
    if s is None:
        raise Blocked(f"no shape known for '{getattr(node, 'name', node)}'")
    return len(s)


