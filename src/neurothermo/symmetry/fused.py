"""Transfer rules for indexing, tuples and fused projections (used by ``flow.py``).

A fused projection computes several layers' units in one matrix product: timm's ``qkv`` Linear
(``3·d`` outputs, reshaped to ``(…, 3, heads, head_dim)`` and unbound), GPT-2's ``c_attn``
(``split(d, dim=-1)``), GPT-NeoX's ``query_key_value`` (per head ``[q, k, v]``: viewed as
``(…, heads, 3·d)`` and chunked, one segment of ``d`` rows per head and part; ``Track.head``
remembers the head until the parts are separated). The walk of the whole layer stops with
:class:`Fused` at the split; detection then walks one producer per segment (rows ``k·d:(k+1)·d``
of the weight: a view, no copy), whose track remembers which segment is its own (``Track.seg``)
until the segments are separated by ``unbind`` / ``split`` / ``chunk`` / an integer index.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.fx as fx

from neurothermo.symmetry.base import ParamSlice
from neurothermo.symmetry.batched import NOT_MERGED
from neurothermo.symmetry.trace import Traced
from neurothermo.symmetry.units import Blocked, Flow, Fused, Producer, Track, flat_args, label


def segment_producers(prod: Producer, count: int,
                      sizes: tuple[int, ...] | None = None) -> list[Producer]:
    """One producer per segment of a fused layer (row ranges of its covariant slices);
    ``sizes``: the segments' sizes when they differ (else ``count`` equal ones)."""
    if (sizes is None and prod.n % count) or (sizes is not None and sum(sizes) != prod.n) \
            or any(s.view is not None or s.start or s.stop is not None for s in prod.cov):
        return []
    widths = sizes if sizes is not None else (prod.n // count,) * count
    out, a = [], 0
    for k, n in enumerate(widths):
        cov = [ParamSlice(s.name, s.role, s.dim, a, a + n, buffer=s.buffer) for s in prod.cov]
        out.append(Producer(prod.node, f"{prod.name}[{a}:{a + n}]", n,
                            replace(prod.track, seg=(k, count), uneven=sizes), cov, prod.diag,
                            caveat=prod.caveat))
        a += n
    return out


_UNEVEN_OK = ("split", "transpose", "permute", "t", "identity", "meta")


def layout_check(node: fx.Node, op: str, mine: list[Track]) -> None:
    """Layouts only some operations follow: heads merged with the batch axis (``batched.py``)
    and segments of uneven sizes (Mamba's ``x_proj`` split into ``[dt, B, C]``), which only
    transposes and the split that separates them pass."""
    if op in NOT_MERGED and any(t.merged for t in mine):
        raise Blocked(f"'{label(node)}' on attention heads merged with the batch axis")
    if op not in _UNEVEN_OK and any(t.uneven is not None for t in mine):
        raise Blocked(f"'{label(node)}' uses segments of uneven sizes before they are split")


def _dim(node: fx.Node, i: int, key: str, nd: int, default: int = 0) -> int:
    d: Any = node.args[i] if len(node.args) > i else node.kwargs.get(key, default)
    return int(d) % nd


def tuple_step(node: fx.Node, t: Track) -> Track | None:
    """``getitem`` of a tuple that holds the units in element ``t.pick``."""
    idx = node.args[1] if len(node.args) > 1 else None
    if idx == t.pick:
        return replace(t, pick=None, strict=False)
    if t.strict and node.users:
        raise Blocked(f"'{label(node)}': element {idx} of the layer's output is used as well")
    return None


def split_step(tr: Traced, flow: Flow, node: fx.Node, op: str, t: Track) -> Track | None:
    """``split`` / ``chunk`` / ``unbind``: separate segments, or split the units (blocked)."""
    si = tr.shape(node.args[0])
    if si is None:
        raise Blocked(f"unknown shape around '{label(node)}'")
    nd = len(si)
    if op == "unbind":
        d = _dim(node, 1, "dim", nd)
        if t.seg is None or d != t.seg_axis:
            raise Blocked(f"'{label(node)}' unbinds the units' tensor along another axis")
        axes = tuple(a - (a > d) for a in t.axes)
        return replace(t, axes=axes, seg=None, seg_axis=None, pick=t.seg[0])
    d = _dim(node, 2, "dim", nd)
    size: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get(
        "split_size_or_sections", node.kwargs.get("chunks"))
    if op == "split" and isinstance(size, list | tuple) and len(set(size)) > 1:
        return _uneven(node, t, d, si, size)
    if op == "split" and isinstance(size, list | tuple) and size:
        size = size[0]  # sections of one size: as split(size)
    count = int(size) if op == "chunk" else (si[d] // int(size) if isinstance(size, int) else 0)
    if len(t.axes) == 2 and d == t.axes[1] and t.seg is None and count >= 2 \
            and not si[d] % count:  # per head [q, k, v] (GPT-NeoX): one segment per head and part
        raise Fused(si[t.axes[0]] * count)
    if len(t.axes) != 1 or d != t.axes[0]:
        # split along another axis: every piece holds the units; not supported
        raise Blocked(f"'{label(node)}' splits the units' tensor")
    if count < 2 or si[d] % count:
        raise Blocked(f"'{label(node)}' splits the units unevenly")
    if t.seg is None:
        raise Fused(count)
    if t.seg[1] != count or t.seg_axis is not None or t.uneven is not None:
        raise Blocked(f"'{label(node)}' splits the fused units differently")
    if t.head is not None:  # now the units of head h alone: a segment of the heads axis
        axis, h, heads = t.head
        return replace(t, seg=(h, heads), seg_axis=axis, head=None, pick=t.seg[0])
    return replace(t, seg=None, pick=t.seg[0])


def _uneven(node: fx.Node, t: Track, d: int, si: tuple[int, ...], size: Any) -> Track:
    """``split(x, [s₀, s₁, …])`` with sections of different sizes along the units' axis: one
    segment per section (rows ``s₀+…+s_{k−1}`` on), each separated here by its own walk."""
    sizes = tuple(size)
    if not all(isinstance(v, int) and v > 0 for v in sizes) or len(t.axes) != 1 \
            or d != t.axes[0] or sum(sizes) != si[d] or t.repeat != 1:
        raise Blocked(f"'{label(node)}' splits the units unevenly")
    if t.seg is None:
        raise Fused(len(sizes), sizes)
    if t.uneven != sizes or t.seg_axis is not None or t.head is not None:
        raise Blocked(f"'{label(node)}' splits the fused units differently")
    return replace(t, seg=None, uneven=None, pick=t.seg[0])


def _full(s: slice, size: int) -> bool:
    if not all(v is None or isinstance(v, int) for v in (s.start, s.stop, s.step)):
        return False  # bounds computed in the graph
    start, stop, step = s.start or 0, s.stop, s.step or 1
    return step == 1 and start in (0, -size) and (stop is None or stop >= size)


def index_step(tr: Traced, flow: Flow, node: fx.Node, t: Track) -> Track | None:
    """Basic indexing ``x[:, -1]``, ``x[..., None]``: the units pass if their axes are kept whole."""
    si, idx = tr.shape(node.args[0]), node.args[1]
    if t.head is not None or t.uneven is not None:
        raise Blocked(f"'{label(node)}' indexes the fused units before they are separated")
    if si is None:
        raise Blocked(f"unknown shape around '{label(node)}'")
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, fx.Node | list) or not isinstance(i, int | slice | type(None) | type(...))
           for i in items):
        raise Blocked(f"'{label(node)}' indexes the units' tensor with a tensor")
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if used > len(si):
        raise Blocked(f"'{label(node)}': too many indices")
    expanded: list[Any] = []
    for i in items:
        expanded += [slice(None)] * (len(si) - used) if i is Ellipsis else [i]
    if Ellipsis not in items:
        expanded += [slice(None)] * (len(si) - used)
    mapping: dict[int, int] = {}
    seg_axis, drop = t.seg_axis, False
    a_in = a_out = 0
    for it in expanded:
        if it is None:
            a_out += 1
            continue
        if isinstance(it, int):
            if a_in in t.axes:
                raise Blocked(f"'{label(node)}' picks single units (getitem)")
            if a_in == t.seg_axis and t.seg is not None:
                if it % t.seg[1] != t.seg[0]:
                    drop = True
                seg_axis = None
            a_in += 1
            continue
        if a_in in t.axes and not _full(it, si[a_in]):
            raise Blocked(f"'{label(node)}' slices the units (getitem)")
        mapping[a_in] = a_out
        a_in, a_out = a_in + 1, a_out + 1
    if drop:
        return None
    axes = tuple(mapping[a] for a in t.axes)
    if t.seg_axis is not None and seg_axis is None:
        return replace(t, axes=axes, seg=None, seg_axis=None)
    return replace(t, axes=axes, seg_axis=None if seg_axis is None else mapping[seg_axis])


def cat_step(tr: Traced, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track:
    """``cat`` of the units with empty tensors only (e.g. an empty key/value cache) passes."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(parts, list | tuple):
        raise Blocked(f"'{label(node)}' with unknown operands")
    mine = [p for p in parts if isinstance(p, fx.Node) and p in tracks]
    others = [p for p in parts if not (isinstance(p, fx.Node) and p in tracks)]
    shapes = [tr.shape(p) for p in others]
    if len(mine) != 1 or any(s is None or 0 not in s for s in shapes):
        raise Blocked(f"'{label(node)}' concatenates the units with other tensors")
    return tracks[mine[0]]


def check_plain(node: fx.Node, tracks: dict[fx.Node, Track]) -> None:
    """Operations other than the segment/tuple ones need the units separated and unpacked."""
    for a in flat_args(node):
        if isinstance(a, fx.Node) and a in tracks:
            t = tracks[a]
            if t.pick is not None:
                raise Blocked(f"'{label(node)}' uses the layer's output tuple as a whole")
            if t.seg is not None:
                raise Blocked(f"'{label(node)}' uses the fused units before they are split")
