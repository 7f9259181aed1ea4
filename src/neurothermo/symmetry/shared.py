"""Transfer rules through attention (``scaled_dot_product_attention``, eager ``softmax(q·kᵀ) @ v``)
and for key/value heads shared by several query heads (grouped-query attention).

In grouped-query attention (Llama with ``num_key_value_heads < num_attention_heads``) value head
``j`` serves the ``n_rep`` query heads ``j·n_rep … j·n_rep+n_rep−1``: Hugging Face's ``repeat_kv``
(``v[:, :, None].expand(b, kv, n_rep, t, d).reshape(b, kv·n_rep, t, d)``), ``repeat_interleave(
n_rep, dim=1)`` or ``scaled_dot_product_attention(…, enable_gqa=True)``. Rotating value head
``j``'s rows by ``G`` turns every copy of it into ``v_j·Gᵀ``; each query head ``h`` of the group
mixes only copies of ``v_j`` over time (softmax weights do not see ``v``), so its output is
``y_h·Gᵀ``, and the output projection's columns of head ``h`` transformed by ``G⁻ᵀ`` undo it:
one exact double rotation per value head, acting on ``v_proj`` rows ``j·d:(j+1)·d`` and on the
``n_rep`` column blocks of ``o_proj`` of its query heads.

The units of one value head are not one slice along an axis of ``o_proj``'s weight when
``n_rep > 1`` (its columns are ``n_rep`` separate blocks), so the walk of the whole layer stops
with :class:`Fused` where the heads are repeated and detection walks one producer per value head
(``segment_producers``: ``Track.seg`` is the head, ``Track.copies`` how many query heads read
it). The query/key side is not searched: a key head shared by several query heads would have to
rotate with all of them at once (and rotary embeddings rule the rotation out in Llama anyway).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.fx as fx

from neurothermo.symmetry.base import ParamSlice
from neurothermo.symmetry.trace import Traced
from neurothermo.symmetry.units import Blocked, Flow, Fused, Track, flat_args, label, ndim_of

UNSUPPORTED = ("repeats the units along an axis other than right after the attention heads "
               "(shared key/value heads are followed as heads → [:, :, None] → expand → reshape, "
               "repeat_interleave over the heads, or sdpa(enable_gqa=True))")
QK_SHARED = ("key heads shared by several query heads (grouped-query attention): the query-key "
             "rotation is not searched (only the value-output rotation per shared value head)")


def expand_step(tr: Traced, node: fx.Node, t: Track) -> Track:
    """``expand`` of a size-1 axis inserted right after the heads axis (``repeat_kv``)."""
    si, so = tr.shape(node.args[0]), tr.shapes.get(node)
    if si is None or so is None:
        raise Blocked(f"unknown shapes around '{label(node)}'")
    if len(si) != len(so):
        raise Blocked(f"'{label(node)}' {UNSUPPORTED}")
    grown = [d for d in range(len(si)) if si[d] != so[d]]
    if not grown:
        return t
    if len(grown) == 1 and t.copy_axis is None and t.copies == 1:
        d = grown[0]
        if t.seg is not None and t.seg_axis is not None and d == t.seg_axis + 1:
            return replace(t, copy_axis=d)
        if t.seg is None and len(t.axes) == 2 and d == t.axes[0] + 1:
            raise Fused(si[t.axes[0]])  # one walk per shared head
    raise Blocked(f"'{label(node)}' {UNSUPPORTED}")


def repeat_step(tr: Traced, node: fx.Node, t: Track) -> Track:
    """``repeat_interleave(n_rep, dim=heads)``: each head becomes ``n_rep`` consecutive copies."""
    si = tr.shape(node.args[0])
    reps: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim: Any = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if si is None or not isinstance(reps, int) or not isinstance(dim, int):
        raise Blocked(f"'{label(node)}' {UNSUPPORTED}")
    dim %= len(si)
    if t.seg is not None and t.seg_axis == dim and t.copy_axis is None:
        return replace(t, copies=t.copies * reps)
    if t.seg is None and len(t.axes) == 2 and dim == t.axes[0]:
        raise Fused(si[dim])
    raise Blocked(f"'{label(node)}' {UNSUPPORTED}")


def gqa_value(tr: Traced, node: fx.Node, value: Any, t: Track, nd: int) -> Track:
    """The output track of ``scaled_dot_product_attention`` for the units in ``value``."""
    so = tr.shapes.get(node)
    if t.seg is not None and (t.seg_axis != nd - 3 or t.axes != (nd - 1,)):
        raise Blocked("scaled_dot_product_attention uses the fused units before they are split")
    if so is None or nd < 3 or len(so) < 3 or so[-3] == tr.shape(value)[-3]:  # type: ignore[index]
        return t
    hv, ho = tr.shape(value)[-3], so[-3]  # type: ignore[index]
    if ho % hv:
        raise Blocked("scaled_dot_product_attention with a head count that is not a multiple "
                      "of the value heads")
    if t.seg is not None:
        return replace(t, copies=t.copies * (ho // hv))
    if len(t.axes) == 2 and t.axes[0] == nd - 3:
        raise Fused(hv)
    raise Blocked("scaled_dot_product_attention(enable_gqa=True) over another axis than the "
                  "heads")


def shared_columns(flow: Flow, name: str, t: Track, width: int) -> list[ParamSlice]:
    """The consumer's columns of every copy of the units (one slice per query head).

    The unit axis holds ``count`` segments of ``copies·n`` features, segment ``k`` (ours) being
    ``copies`` consecutive copies of the ``n`` units: copy ``r`` is columns
    ``(k·copies + r)·n … (k·copies + r + 1)·n`` of a weight ``[out, width]``.
    """
    assert t.seg is not None
    k, count = t.seg
    n, c = flow.producer.n, t.copies
    if t.repeat != 1 or width != count * c * n:
        raise Blocked(f"'{name}' does not line up with the shared heads")
    return [ParamSlice(name, "out", 1, (k * c + r) * n, (k * c + r + 1) * n) for r in range(c)]


def weights_times_value(tr: Traced, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track | None:
    """``softmax(q·kᵀ) @ v`` over shared value heads (eager attention after ``repeat_kv``).

    The product contracts time and is batched over the heads, so query head ``h`` mixes only
    its own copy of value head ``j`` over time, with weights that do not see ``v``: the units
    and their segment stay where they were (as through ``scaled_dot_product_attention``).
    None: not this pattern (the ordinary rules decide)."""
    a, b = node.args[0], node.args[1]
    if not isinstance(b, fx.Node) or b not in tracks or (isinstance(a, fx.Node) and a in tracks):
        return None
    t, so = tracks[b], tr.shapes.get(node)
    nd = len(tr.shape(b) or ())
    if t.seg is None or t.seg_axis is None or t.pick is not None or t.copy_axis is not None \
            or so is None or len(so) != nd or t.seg_axis >= nd - 2:
        return None
    if t.axes == (nd - 2,):  # q·kᵀ with shared key heads
        raise Blocked(QK_SHARED)
    return t if t.axes == (nd - 1,) else None


def sdpa_step(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track | None:
    """The units as the value (passed on, per shared head) or as the query / key (a bilinear
    contraction, paired in ``detect.py`` with the other side: per head for per-head segments)."""
    names = ("query", "key", "value")
    args: dict[str, Any] = {
        k: (node.args[i] if len(node.args) > i else node.kwargs.get(k)) for i, k in enumerate(names)
    }
    hit = [k for k, v in args.items() if isinstance(v, fx.Node) and v in tracks]
    extra = [a for a in flat_args(node) if isinstance(a, fx.Node) and a in tracks
             and all(a is not v for v in args.values())]
    if len(hit) != 1 or extra:
        raise Blocked("scaled_dot_product_attention uses the units in several roles")
    k = hit[0]
    t = tracks[args[k]]
    nd = ndim_of(tr, args[k])
    if t.pick is not None or t.copy_axis is not None:
        raise Blocked("scaled_dot_product_attention uses the layer's output tuple as a whole")
    if t.axes[-1] != nd - 1 or (len(t.axes) == 2 and t.axes[0] >= nd - 2):
        raise Blocked("scaled_dot_product_attention over another axis than the units'")
    if k == "value":
        out = gqa_value(tr, node, args[k], t, nd)
        flow.path.append("attention")
        return out
    if node.kwargs.get("enable_gqa") or (t.seg is not None and (
            t.copies != 1 or t.seg_axis != nd - 3 or t.axes != (nd - 1,))):
        raise Blocked(QK_SHARED)
    # one head of a fused projection split per head (GPT-NeoX): paired with the same head
    flow.bilinear.append((node if t.seg is None else (node, t.seg[0]), "A" if k == "query" else "B"))
    return None
