"""Transfer rules: how each operation passes a layer's units on, restricts the group classes
that commute with it, or ends the flow (see ``flow.py``)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch.fx as fx
from torch import nn

from neurothermo.symmetry.base import ParamSlice
from neurothermo.symmetry.batched import merged_reshape
from neurothermo.symmetry.gated import gate_step
from neurothermo.symmetry.trace import ELEMENTWISE, HOMOGENEOUS, ODD, Traced
from neurothermo.symmetry.units import (
    _DIAG,
    _ELEM,
    _HOMOG,
    _LINEAR,
    _ODD,
    _SCALES,
    ALL,
    Blocked,
    Flow,
    Fused,
    Track,
    label,
    ndim_of,
    unit_slice,
)


def elementwise(tr: Traced, flow: Flow, op: str, track: Track, node: fx.Node) -> Track:
    if op in ("max_pool", "avg_pool") and (track.axes != (1,) or track.repeat != 1):
        raise Blocked(f"{op} over the units' axis")
    if op in HOMOGENEOUS:
        allowed = _HOMOG
    elif op in ODD:
        allowed = _ODD
    elif op in ELEMENTWISE or op == "relu6":
        allowed = _ELEM
    elif op == "dropout":
        allowed = frozenset({"rescale", "sign"})  # random masks: not permutation-equivariant
    elif op in _LINEAR:
        allowed = ALL
    else:
        raise Blocked(f"unsupported operation '{op}' on the units")
    if len(track.axes) == 2 and "gl" not in allowed:
        raise Blocked(f"nonlinear '{op}' on attention heads")
    flow.linear = flow.linear and allowed == ALL
    why = {_HOMOG: "positively homogeneous", _ODD: "odd", _ELEM: "elementwise"}.get(allowed, "")
    flow.restrict(allowed, f"'{label(node)}' is only {why}" if why else f"'{label(node)}'")
    flow.path.append(label(node))
    return track


def prelu_slope(flow: Flow, name: str, numel: int, track: Track, buffer: bool = False) -> None:
    if numel == 1:
        return
    if track.axes != (1,) or numel != flow.producer.n or track.repeat != 1:
        raise Blocked("per-channel PReLU slope does not line up with the units")
    flow.passive.append(ParamSlice(name, "passive", 0, buffer=buffer))


def depthwise_columns(flow: Flow, path: str, mod: nn.modules.conv._ConvNd, name: str,
                       shape: tuple[int, ...]) -> ParamSlice:
    """The weights of a depthwise convolution that read each input channel (the unit).

    With ``groups == in_channels`` the weight is ``[in·m, 1, k…]`` and output channels
    ``c·m … c·m+m−1`` read input channel ``c`` alone: viewed as ``[in, m, 1, k…]`` its rows along
    dim 0 are exactly the entries unit ``c`` meets. Scaling input channel ``c`` by ``s_c`` and those
    rows by ``1/s_c`` is exact (a convolution is linear in its input, channel by channel; the
    bias does not see the input), for any ``s_c ≠ 0``: rescale and sign flip survive. A
    permutation or a rotation of the input channels is not: it would change which channel each
    output reads (exact only with the output channels permuted too, which is a different
    symmetry). A grouped convolution with several input channels per group is not followed:
    the entries of input channel ``c`` (``W[o, c mod in/g]`` for the ``o`` of ``c``'s group) are
    not one slice along an axis of any view of the weight.
    """
    cin, groups = mod.in_channels, mod.groups
    if cin != groups:
        raise Blocked(f"'{path}' is a grouped convolution with {cin // groups} input channels "
                      "per group over the units (only depthwise ones, one input channel per "
                      "group, are followed)")
    flow.restrict(_SCALES, f"'{path}' is a depthwise convolution: each input channel has its "
                           "own filters, so the channels can be scaled but not mixed or permuted")
    return ParamSlice(name, "out", 0, view=(groups, shape[0] // groups, *shape[1:]))


def norm_step(tr: Traced, flow: Flow, path: str, mod: nn.Module, t: Track, nd: int) -> Track:
    n, r = flow.producer.n, t.repeat
    if len(t.axes) == 2:
        raise Blocked(f"normalisation '{path}' over attention heads")
    if isinstance(mod, nn.GroupNorm):
        return _group_norm(flow, path, mod, t)
    is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
    if is_bn:
        if t.axes[0] != 1:
            raise Blocked(f"BatchNorm '{path}' normalises another axis than the units'")
        batch_stats = mod.training or mod.running_mean is None
        kind = "channel"
    else:
        shape: Any = mod.normalized_shape
        if tuple(shape) != (n * r,) or t.axes[0] != nd - 1:
            raise Blocked(f"'{path}' normalises over more than the units' axis")
        batch_stats, kind = True, "whole"
    ok = bool(flow.classes & {"gl", "rescale"})
    if batch_stats:
        flow.norms.append((path, kind, ok))
        flow.restrict(_ELEM, f"normalised by '{path}'")
    else:
        why = (f"BatchNorm '{path}' is in eval mode: it normalises with fixed running statistics, "
               "which do not remove the scale (train-mode-only symmetry)")
        flow.restrict(_ELEM, why)
        flow.eval_norms.append((path, why))
    for attr in ("weight", "bias", "running_mean", "running_var"):
        val = getattr(mod, attr, None)
        if val is not None:
            flow.passive.append(unit_slice(f"{path}.{attr}", "passive", 0, tuple(val.shape), n, r,
                                       buffer=attr.startswith("running")))
    flow.path.append(path)
    return replace(t, normed=t.normed or batch_stats)


def _group_norm(flow: Flow, path: str, mod: nn.GroupNorm, t: Track) -> Track:
    n, g = flow.producer.n, mod.num_groups
    if t.axes != (1,) or t.repeat != 1 or mod.num_channels != n:
        raise Blocked(f"GroupNorm '{path}' normalises other axes than the units' channels")
    flow.groups = g
    flow.norms.append((path, "group", bool(flow.classes & {"gl", "rescale"})))
    flow.restrict(_ELEM if g in (1, n) else frozenset(),
                  f"normalised by '{path}' in groups of {n // g} channels (permutations across "
                  "groups change the groups' statistics)")
    for attr in ("weight", "bias"):
        if getattr(mod, attr, None) is not None:
            flow.passive.append(ParamSlice(f"{path}.{attr}", "passive", 0))
    flow.path.append(path)
    return replace(t, normed=True)


def _groups(si: tuple[int, ...], so: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output axes with equal products (a reshape's axis map)."""
    groups, i, j = [], 0, 0
    while i < len(si) or j < len(so):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(si):
            gi.append(i); pi *= si[i]; i += 1  # noqa: E702
        if j < len(so):
            gj.append(j); pj *= so[j]; j += 1  # noqa: E702
        while pi != pj and (i < len(si) or j < len(so)):
            if (pi < pj and i < len(si)) or j >= len(so):
                gi.append(i); pi *= si[i]; i += 1  # noqa: E702
            else:
                gj.append(j); pj *= so[j]; j += 1  # noqa: E702
        groups.append((gi, gj))
    return groups


def reshape_step(tr: Traced, flow: Flow, node: fx.Node, op: str, t: Track) -> Track:
    src = node.args[0]
    si, so = tr.shape(src), tr.shapes.get(node)
    if si is None or so is None:
        raise Blocked(f"unknown shapes around '{label(node)}'")
    nd = len(si)
    if op in ("transpose", "permute", "t"):
        if op == "t" and node.op == "call_function" and node.target is getattr and node.args[1] == "T":
            perm = list(range(nd))[::-1]
        elif op == "t":
            perm = list(range(nd))
            perm[-1], perm[-2] = perm[-2], perm[-1]
        elif op == "transpose":
            a: Any = list(node.args[1:3]) or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
            d0, d1 = int(a[0]) % nd, int(a[1]) % nd
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            dims: Any = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 \
                else node.kwargs["dims"]
            perm = [int(d) % nd for d in dims]
        seg_axis = None if t.seg_axis is None else perm.index(t.seg_axis)
        head = None if t.head is None else (perm.index(t.head[0]), *t.head[1:])
        return replace(t, axes=tuple(perm.index(x) for x in t.axes), seg_axis=seg_axis, head=head)
    if t.head is not None or t.uneven is not None:
        raise Blocked(f"'{label(node)}' reshapes the fused units before they are separated")
    groups = _groups(si, so)

    def find(a: int) -> tuple[list[int], list[int]]:
        g = next(g for g in groups if a in g[0])
        return [d for d in g[0] if si[d] != 1 or d == a], [d for d in g[1] if so[d] != 1]

    if t.seg_axis is not None:
        keep = [find(a) for a in (*t.axes, t.seg_axis)]
        inner_ok = all(len(i) == 1 and len(o) == 1 for i, o in keep[:-1])
        si_, so_ = keep[-1]
        if t.copy_axis is not None:  # repeat_kv: [heads, n_rep] merged into the query heads
            if not inner_ok or si_ != [t.seg_axis, t.copy_axis] or len(so_) != 1:
                raise Blocked(f"'{label(node)}' reshapes the repeated heads in an unsupported way")
            return replace(t, axes=tuple(o[0] for _, o in keep[:-1]), seg_axis=so_[0],
                           copy_axis=None, copies=t.copies * si[t.copy_axis])
        if inner_ok and len(si_) == 1 and len(so_) == 1:
            return replace(t, axes=tuple(o[0] for _, o in keep[:-1]), seg_axis=so_[0])
        if len(t.axes) == 1 and si_ == [t.seg_axis, t.axes[0]] and len(so_) == 1 \
                and t.repeat == 1:  # heads merged back with the units: [heads, d] → [heads·d]
            return replace(t, axes=(so_[0],), seg_axis=None)
        raise Blocked(f"'{label(node)}' reshapes the fused units before they are separated")
    if len(t.axes) == 1:
        ax = t.axes[0]
        ie, oe = find(ax)
        if ie == [ax] and len(oe) == 1:
            return replace(t, axes=(oe[0],))
        if t.seg is not None and ie == [ax] and len(oe) == 2 and t.repeat == 1 \
                and so[oe[1]] * so[oe[0]] == t.seg[1] * flow.producer.n and so[oe[0]] < t.seg[1] \
                and not t.seg[1] % so[oe[0]]:
            parts = t.seg[1] // so[oe[0]]  # [heads, parts·n]: per head its parts (GPT-NeoX)
            h, k = divmod(t.seg[0], parts)
            return replace(t, axes=(oe[1],), seg=(k, parts), head=(oe[0], h, so[oe[0]]))
        if t.seg is not None and ie == [ax] and len(oe) in (2, 3) and so[oe[0]] == t.seg[1] \
                and t.repeat == 1:
            if len(oe) == 3:
                flow.block = so[oe[2]]
            return replace(t, axes=tuple(oe[1:]), seg_axis=oe[0])
        if t.seg is None and ie == [ax] and len(oe) == 3 and t.repeat == 1:
            raise Fused(so[oe[0]])
        if ie == [ax] and len(oe) == 2 and t.repeat == 1:
            flow.block = so[oe[1]]
            return replace(t, axes=(oe[0], oe[1]))
        if ie and ie[0] == ax and len(oe) == 1:
            return replace(t, axes=(oe[0],), repeat=t.repeat * math.prod(si[d] for d in ie[1:]))
        raise Blocked(f"'{label(node)}' reshapes the units together with other axes")
    h, i = t.axes
    (ih, oh), (ii, oi) = find(h), find(i)
    if ih == [h, i] == ii and len(oh) == 1 and not t.merged:
        return replace(t, axes=(oh[0],))
    if ih == [h] and ii == [i] and len(oh) == 1 and len(oi) == 1:
        return replace(t, axes=(oh[0], oi[0]))
    return merged_reshape(node, t, si, so, (ih, oh), (ii, oi))  # heads and batch (batched.py)


def _shift(t: Track, by: int) -> Track:
    return replace(t, axes=tuple(a + by for a in t.axes))


def binary_step(tr: Traced, flow: Flow, node: fx.Node, op: str, tracks: dict[fx.Node, Track]) -> Track:
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    so = tr.shapes.get(node)
    if so is None:
        raise Blocked(f"unknown shape of '{label(node)}'")
    ta = tracks.get(a) if isinstance(a, fx.Node) else None
    tb = tracks.get(b) if isinstance(b, fx.Node) else None
    if ta is not None and tb is not None:
        ma, mb = _shift(ta, len(so) - ndim_of(tr, a)), _shift(tb, len(so) - ndim_of(tr, b))
        if ma != mb:
            raise Blocked(f"'{label(node)}' combines the units with a rearranged copy of them")
        if op in ("mul", "div"):
            flow.restrict(_ELEM, f"'{label(node)}' multiplies the units with themselves")
        flow.path.append(label(node))
        return ma
    t, other, first = (ta, b, True) if ta is not None else (tb, a, False)
    assert t is not None
    src = a if first else b
    t = _shift(t, len(so) - ndim_of(tr, src))
    osh = tr.shape(other) if other is not None else ()
    if osh is None:
        raise Blocked(f"'{label(node)}' with an operand of unknown shape")
    off = len(so) - len(osh)
    sizes = [osh[x - off] if x - off >= 0 else 1 for x in t.axes]
    lbl = label(node)
    if all(s == 1 for s in sizes):
        if op in ("add", "sub"):
            flow.restrict(_ELEM, f"'{lbl}' adds a constant shift, which breaks homogeneity")
        elif op == "div" and not first:
            flow.restrict(_ELEM, f"'{lbl}' divides by the units")
        flow.path.append(lbl)
        return t
    if len(t.axes) == 2:
        raise Blocked(f"'{lbl}' combines attention heads with another tensor")
    dim = t.axes[0] - off
    per_unit = all(s == 1 for k, s in enumerate(osh) if k != dim)
    attr = tr.attr(other)
    n, r = flow.producer.n, t.repeat
    oname = getattr(other, "name", str(other))
    if attr is not None and per_unit:
        kind, name = attr
        if kind == "const":
            raise Blocked(f"'{lbl}' combines the units with a constant tensor, which does not "
                          "transform")
        sl = unit_slice(name, "passive", dim, osh, n, r, buffer=kind == "buffer")
        if op in ("add", "sub") and kind == "param":
            flow.cov.append(replace(sl, role="in"))
        elif op in ("add", "sub"):
            flow.restrict(_ELEM, f"'{lbl}' adds the fixed tensor '{name}' (a buffer, not a "
                                 "trainable parameter): it does not transform with the units")
            flow.passive.append(sl)
        else:
            flow.restrict(_DIAG if first or op == "mul" else _ELEM, f"'{lbl}' scales the units by '{name}'")
            flow.passive.append(sl)
        flow.path.append(lbl)
        return t
    if op in ("add", "sub"):
        raise Blocked(f"residual add across the units: '{lbl}' adds them to '{oname}', "
                      "another stream that does not transform with them")
    if op == "mul":
        return gate_step(flow, node, 0 if first else 1, t, oname)
    raise Blocked(f"'{lbl}' combines the units elementwise with '{oname}'")


def _consume(flow: Flow, name: str, sl: ParamSlice, t: Track) -> None:
    flow.consumers.append((name, [sl], t.normed))


def _param_consumer(tr: Traced, flow: Flow, w: Any, t: Track, rows: bool, what: str) -> bool:
    pv = tr.param_view(w)
    if pv is None:
        return False
    name, flipped = pv
    shape = tr.shape(w)
    if shape is None or len(shape) != 2:
        raise Blocked(f"'{what}' with a weight that is not a matrix")
    dim = (0 if rows else 1) ^ int(flipped)
    wshape = tuple(shape[::-1] if flipped else shape)
    sl = unit_slice(name, "out", dim, wshape, flow.producer.n, t.repeat)
    _consume(flow, name.removesuffix(".weight"), sl, t)
    return True


def addmm_step(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track]) -> None:
    """``addmm(bias, x, W)`` = ``bias + x @ W`` (Hugging Face ``Conv1D``): ``W``'s rows consume ``x``."""
    bias, mat1, mat2 = node.args[0], node.args[1], node.args[2]
    if any(isinstance(a, fx.Node) and a in tracks for a in (bias, mat2)) or not (
            isinstance(mat1, fx.Node) and mat1 in tracks):
        raise Blocked("addmm uses the units as its bias or weight")
    t = tracks[mat1]
    if len(t.axes) != 1 or t.axes[0] != ndim_of(tr, mat1) - 1:
        raise Blocked("addmm over another axis than the units'")
    if not _param_consumer(tr, flow, mat2, t, rows=True, what="addmm"):
        raise Blocked("addmm with a weight that is not a parameter")


def linear_step(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track],
                    src: Any) -> None:
    if src not in tracks or len(tracks[src].axes) == 2 or tracks[src].axes[0] != ndim_of(tr, src) - 1:
        raise Blocked("F.linear over another axis than the units'")
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not _param_consumer(tr, flow, w, tracks[src], rows=False, what="linear"):
        raise Blocked("F.linear with a weight that is not a parameter")
    return None


def matmul_step(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track | None:
    a, b = node.args[0], node.args[1]
    so = tr.shapes.get(node)
    ta = tracks.get(a) if isinstance(a, fx.Node) else None
    tb = tracks.get(b) if isinstance(b, fx.Node) else None
    if so is None or (ta is not None and tb is not None):
        raise Blocked("matmul of the units with themselves")
    t, src, side = (ta, a, "A") if ta is not None else (tb, b, "B")
    assert t is not None
    nd = ndim_of(tr, src)
    if nd < 2 or len(so) < 2:
        raise Blocked("matmul with a vector operand")
    contracted = nd - 1 if side == "A" else nd - 2
    if contracted not in t.axes:
        flow.path.append("matmul")
        return _shift(t, len(so) - nd)
    other = b if side == "A" else a
    if len(t.axes) == 1 and _param_consumer(tr, flow, other, t, rows=side == "A", what="matmul"):
        return None
    if tr.attr(other) is not None:
        raise Blocked("matmul of attention heads with a parameter")
    inner = t.axes[-1]
    if inner != contracted or (len(t.axes) == 2 and t.axes[0] >= nd - 2):
        raise Blocked("matmul contracts attention heads")
    flow.bilinear.append((node, side))
    return None
