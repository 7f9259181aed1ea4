"""Attention heads merged with the batch axis, and tensors tiled with ``repeat`` (used by
``flow.py`` and ``ops.py``).

DeBERTa's ``transpose_for_scores`` views ``[b, T, h·d]`` as ``[b, T, h, d]``, permutes to
``[b, h, T, d]`` and views the result as ``[b·h, T, d]`` for ``torch.bmm``: the heads axis is
merged with the batch axis in front of it, and head ``j`` of sample ``s`` sits at index
``s·h + j`` — the head is the index mod ``h`` (``Track.merged = h``). A per-head transformation
acts there on each index by the matrix of its head, and every operation that treats the merged
axis as a batch axis (``bmm``, elementwise scaling, transposes of the other axes) commutes with
it exactly as with a plain heads axis. Viewing ``[b·h, …]`` back as ``[b, h, …]`` restores the
plain heads axis. Only a merge with the heads axis fastest (last) is followed: other orders
would interleave the heads differently.

``x.repeat(r₀, r₁, …)`` tiles ``x``: ``out[i] = x[i mod size]`` along every tiled axis. Tiling
along an axis other than the units' copies the units unchanged, so it commutes with any
transformation of them. Tiling the heads axis (DeBERTa repeats the projected relative position
embeddings ``[h, 2k, d]`` over the batch: ``[b·h, 2k, d]``) puts head ``j``'s copies at the
indices ``≡ j mod h``: the merged layout again. Tiling the units' own axis (or a head's inner
axis) would put several copies of one unit side by side and is not followed.
"""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from neurothermo.symmetry.trace import Traced
from neurothermo.symmetry.units import Blocked, Track, label

NOT_MERGED = ("expand", "repeat_interleave", "split", "chunk", "unbind", "cat")


def merged_reshape(node: fx.Node, t: Track, si: tuple[int, ...], so: tuple[int, ...],
                   head: tuple[list[int], list[int]], inner: tuple[list[int], list[int]]) -> Track:
    """A reshape of a heads track ``(h, i)`` that merges the heads axis with the axes before it
    (``[b, h] → [b·h]``) or splits such a merged axis back (``[b·h] → [b, h]``); ``head`` and
    ``inner``: the input and output axes each is reshaped with (size-1 axes dropped)."""
    h, i = t.axes
    (ih, oh), (ii, oi) = head, inner
    if ii == [i] and len(oi) == 1:
        if not t.merged and len(ih) >= 2 and ih[-1] == h and len(oh) == 1:
            return replace(t, axes=(oh[0], oi[0]), merged=si[h])
        if t.merged and ih == [h] and len(oh) >= 2 and so[oh[-1]] == t.merged:
            return replace(t, axes=(oh[-1], oi[0]), merged=0)
    raise Blocked(f"'{label(node)}' reshapes attention heads in an unsupported way")


def tile_step(tr: Traced, node: fx.Node, t: Track) -> Track:
    """``x.repeat(r₀, r₁, …)``: passes unless it tiles the units (see the module docstring)."""
    si, so = tr.shape(node.args[0]), tr.shapes.get(node)
    if si is None or so is None or len(so) < len(si):
        raise Blocked(f"unknown shapes around '{label(node)}'")
    if t.head is not None or t.seg is not None or t.pick is not None:
        raise Blocked(f"'{label(node)}' repeats the fused units before they are separated")
    off = len(so) - len(si)  # repeat with more counts than axes prepends axes
    axes = tuple(a + off for a in t.axes)
    tiled = {d + off for d in range(len(si)) if so[d + off] != si[d]}
    if len(axes) == 1 and axes[0] in tiled:
        raise Blocked(f"'{label(node)}' tiles the units' axis (copies of the units side by side)")
    if len(axes) == 2 and axes[1] in tiled:
        raise Blocked(f"'{label(node)}' tiles the attention heads' inner axis")
    merged = t.merged
    if len(axes) == 2 and axes[0] in tiled and not merged:
        merged = si[t.axes[0]]
    return replace(t, axes=axes, merged=merged,
                   seg_axis=None if t.seg_axis is None else t.seg_axis + off)
