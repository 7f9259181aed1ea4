"""Follow the units of one layer through the traced graph (the core of detection).

A *producer* creates units along one axis of its output (``nn.Linear``/``F.linear``/``x @ W``:
the last axis; convolutions: the channel axis; BatchNorm/LayerNorm affine parameters). The walk
visits every operation downstream of it and tracks where the unit axis goes (reshapes into heads,
transposes, flattening ``C×H×W``). Each operation either passes the units on, restricting the
group classes that commute with it, or ends the flow:

* ``gl``: any invertible matrix (only linear operations in between) → double rotation,
* ``rescale``: positive diagonal (positively homogeneous activations),
* ``sign``: ±1 diagonal (odd activations),
* ``perm``: permutations (any elementwise operation),

and sinks: *consumers* (a layer contracting the units with its weights: the ``out`` slices),
*normalisations* (remove the scale: scale symmetry), *bilinear* contractions with another
producer's units (attention ``q·kᵀ``), and *blockers* (residual adds, reductions, the model
output, unknown operations), which are recorded with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx as fx
from torch import nn

from neurothermo.symmetry.base import ParamSlice
from neurothermo.symmetry.scale import WeightNormInfo, weight_norm_info
from neurothermo.symmetry.trace import ELEMENTWISE, HOMOGENEOUS, ODD, Traced, module_op, op_name

ALL = frozenset({"gl", "rescale", "sign", "perm"})
_HOMOG = frozenset({"rescale", "perm"})
_ODD = frozenset({"sign", "perm"})
_ELEM = frozenset({"perm"})
_DIAG = frozenset({"rescale", "sign", "perm"})
_LINEAR = {"identity", "neg", "avg_pool"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.RMSNorm)


class Blocked(Exception):
    """The units cannot pass this operation."""


@dataclass(frozen=True)
class Track:
    """Where the units sit: ``(axis,)`` or ``(head_axis, inner_axis)``; ``repeat`` consecutive
    features per unit along the axis (after flattening ``C×H×W``); ``normed``: after a norm."""

    axes: tuple[int, ...]
    repeat: int = 1
    normed: bool = False


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
    bilinear: list[tuple[fx.Node, str]] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    eval_norms: list[tuple[str, str]] = field(default_factory=list)
    block: int = 0
    linear: bool = True  # no nonlinear operation on the path

    def restrict(self, allowed: frozenset[str], reason: str) -> None:
        for c in self.classes - allowed:
            self.lost.setdefault(c, reason)
        self.classes &= allowed


def _slice(name: str, role: str, dim: int, shape: tuple[int, ...], n: int, repeat: int,
           buffer: bool = False) -> ParamSlice:
    """A slice whose axis ``dim`` holds ``n·repeat`` features, ``repeat`` per unit."""
    if repeat == 1:
        return ParamSlice(name, role, dim, buffer=buffer)
    view = (*shape[:dim], n, repeat, *shape[dim + 1:])
    return ParamSlice(name, role, dim, view=view, buffer=buffer)


def _weight_slices(tr: Traced, path: str, mod: nn.Module, role: str) -> tuple[list[ParamSlice], str]:
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


def find_producers(tr: Traced) -> list[Producer]:
    out: list[Producer] = []
    for node in tr.gm.graph.nodes:
        shape = tr.shapes.get(node)
        try:
            prod = _producer(tr, node, shape)
        except Blocked as err:
            name = str(node.target) if node.op == "call_module" else node.name
            prod = Producer(node, name, 0, Track((0,)), [], problem=str(err))
        if prod is not None:
            out.append(prod)
    return out


def _producer(tr: Traced, node: fx.Node, shape: tuple[int, ...] | None) -> Producer | None:
    if shape is None or len(shape) == 0:
        return None
    last = Track((len(shape) - 1,))
    if node.op == "call_module":
        path = str(node.target)
        mod = tr.gm.get_submodule(path)
        p = f"{path}."
        if isinstance(mod, (nn.Linear, *_CONV)):
            if isinstance(mod, _CONV) and len(shape) < 2:
                return None
            cov, caveat = _weight_slices(tr, path, mod, "in")
            if mod.bias is not None:
                cov.append(ParamSlice(p + "bias", "in", 0))
            track = last if isinstance(mod, nn.Linear) else Track((1,))
            prod = Producer(node, path, shape[track.axes[0]], track, cov)
            if caveat:
                prod.caveat = caveat + ": its rows can only be scaled through g"
            return prod
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine and len(shape) >= 2:
            cov = [ParamSlice(p + "weight", "in", 0), ParamSlice(p + "bias", "in", 0)]
            return Producer(node, path, mod.num_features, Track((1,)), cov, diag=True)
        if isinstance(mod, _NORMS) and len(mod.normalized_shape) == 1 and mod.weight is not None:
            cov = [ParamSlice(p + "weight", "in", 0)]
            if getattr(mod, "bias", None) is not None:
                cov.append(ParamSlice(p + "bias", "in", 0))
            return Producer(node, path, shape[-1], last, cov, diag=True)
        return None
    op = op_name(node)
    if op == "linear":
        w = tr.param_view(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        if w is None:
            return None
        cov = [ParamSlice(w[0], "in", 1 if w[1] else 0)]
        b = tr.attr(node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        if b is not None and b[0] == "param":
            cov.append(ParamSlice(b[1], "in", 0))
        return Producer(node, w[0], shape[-1], last, cov)
    if op == "matmul" and len(node.args) == 2:
        w = tr.param_view(node.args[1])
        if w is None or tr.param_view(node.args[0]) is not None:
            return None
        return Producer(node, w[0], shape[-1], last, [ParamSlice(w[0], "in", 0 if w[1] else 1)])
    return None


def _args(node: fx.Node) -> list[Any]:
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


def walk(tr: Traced, prod: Producer) -> Flow:
    """Follow ``prod``'s units through every downstream operation (in graph order)."""
    flow = Flow(prod)
    if prod.problem:
        flow.blockers.append(prod.problem)
        return flow
    if prod.caveat:
        flow.restrict(_DIAG, prod.caveat)
    tracks: dict[fx.Node, Track] = {prod.node: prod.track}
    started = False
    for node in tr.gm.graph.nodes:
        if node is prod.node:
            started = True
            continue
        if not started or not any(isinstance(a, fx.Node) and a in tracks for a in _args(node)):
            continue
        try:
            new = _step(tr, flow, node, tracks)
        except Blocked as err:
            flow.blockers.append(str(err))
            break
        if new is not None:
            tracks[node] = new
    return flow


def _label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else (op_name(node) or node.name)


def _nd(tr: Traced, node: Any) -> int:
    s = tr.shape(node)
    if s is None:
        raise Blocked(f"no shape known for '{getattr(node, 'name', node)}'")
    return len(s)


def _step(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track | None:
    if node.op == "output":
        raise Blocked("its units reach the model output")
    if node.op == "call_module":
        return _module_step(tr, flow, node, tracks)
    op = op_name(node)
    if op == "meta":
        return None
    if op is None:
        raise Blocked(f"unsupported operation '{node.target}' ({node.op}) on the units")
    src = node.args[0] if node.args else None
    if op in ("add", "sub", "mul", "div"):
        return _binary(tr, flow, node, op, tracks)
    if op == "matmul":
        return _matmul(tr, flow, node, tracks)
    if op == "linear":
        return _consume_linear(tr, flow, node, tracks, src)
    if op == "sdpa":
        return _sdpa(tr, flow, node, tracks)
    if op == "getitem":
        raise Blocked("the units are indexed/sliced (getitem), which no group commutes with")
    if not (isinstance(src, fx.Node) and src in tracks) or any(
        isinstance(a, fx.Node) and a in tracks for a in _args(node)[1:]
    ):
        raise Blocked(f"'{op}' uses the units in an unsupported argument position")
    track = tracks[src]
    if op in ("reshape", "transpose", "permute", "t"):
        return _reshape(tr, flow, node, op, track)
    if op == "dropout":
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return _elementwise(tr, flow, "dropout" if (p and training) else "identity", track, node)
    if op == "hardtanh":
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        op = "hardtanh" if lo == -hi else "relu6"
    if op == "prelu":
        w = tr.attr(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        shape = tr.shape(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        if w is None or shape is None:
            raise Blocked("prelu with an unknown slope")
        _prelu_slope(flow, w[1], math.prod(shape), track, buffer=w[0] != "param")
    return _elementwise(tr, flow, op, track, node)


def _elementwise(tr: Traced, flow: Flow, op: str, track: Track, node: fx.Node) -> Track:
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
    flow.restrict(allowed, f"'{_label(node)}' is only {why}" if why else f"'{_label(node)}'")
    flow.path.append(_label(node))
    return track


def _prelu_slope(flow: Flow, name: str, numel: int, track: Track, buffer: bool = False) -> None:
    if numel == 1:
        return
    if track.axes != (1,) or numel != flow.producer.n or track.repeat != 1:
        raise Blocked("per-channel PReLU slope does not line up with the units")
    flow.passive.append(ParamSlice(name, "passive", 0, buffer=buffer))


def _module_step(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track | None:
    path = str(node.target)
    mod = tr.gm.get_submodule(path)
    src = node.args[0] if node.args else None
    others = [a for a in _args(node)[1:] if isinstance(a, fx.Node) and a in tracks]
    if isinstance(mod, nn.MultiheadAttention):
        qkv = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")]
        qkv = [a for a in qkv if a is not None]
        if len(qkv) != 3 or len({id(a) for a in qkv}) != 1 or src not in tracks:
            raise Blocked(f"'{path}' (MultiheadAttention) does not take the units as query, "
                          "key and value alike")
        t = tracks[src]
        if not mod._qkv_same_embed_dim or len(t.axes) == 2 or t.axes[0] != _nd(tr, src) - 1:
            raise Blocked(f"'{path}' (MultiheadAttention) layout not supported as a consumer")
        sl = _slice(f"{path}.in_proj_weight", "out", 1, tuple(mod.in_proj_weight.shape),
                    flow.producer.n, t.repeat)
        flow.consumers.append((path, [sl], t.normed))
        return None
    if not (isinstance(src, fx.Node) and src in tracks) or others:
        raise Blocked(f"'{path}' ({type(mod).__name__}) uses the units in an unsupported way")
    t = tracks[src]
    nd = _nd(tr, src)
    n, r = flow.producer.n, t.repeat
    if isinstance(mod, (nn.Linear, *_CONV)):
        axis = nd - 1 if isinstance(mod, nn.Linear) else 1
        if len(t.axes) == 2 or t.axes[0] != axis:
            raise Blocked(f"'{path}' does not contract the units' axis")
        if isinstance(mod, _CONV) and (mod.groups != 1 or r != 1):
            raise Blocked(f"'{path}' is a grouped convolution over the units")
        slices, caveat = _weight_slices(tr, path, mod, "out")
        shape = tuple(mod.get_parameter(slices[0].name.removeprefix(path + ".")).shape)
        slices = [_slice(slices[0].name, "out", 1, shape, n, r)]
        if caveat:
            flow.restrict(frozenset({"sign", "perm"}), caveat + ": its columns cannot be scaled")
        flow.consumers.append((path, slices, t.normed))
        return None
    if isinstance(mod, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.RMSNorm):
        return _norm(tr, flow, path, mod, t, nd)
    op = module_op(mod)
    if op is None:
        raise Blocked(f"opaque module '{path}' ({type(mod).__name__})")
    if op == "reshape":
        return _reshape(tr, flow, node, op, t)
    if op == "dropout":
        p = mod.p  # type: ignore[attr-defined]
        op = "dropout" if (p and mod.training) else "identity"
    if op == "softmax" and len(t.axes) == 2:
        raise Blocked("softmax over attention heads")
    if isinstance(mod, nn.PReLU):
        _prelu_slope(flow, f"{path}.weight", mod.num_parameters, t)
    return _elementwise(tr, flow, op, t, node)


def _norm(tr: Traced, flow: Flow, path: str, mod: nn.Module, t: Track, nd: int) -> Track:
    n, r = flow.producer.n, t.repeat
    if len(t.axes) == 2:
        raise Blocked(f"normalisation '{path}' over attention heads")
    is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
    if is_bn:
        if t.axes[0] != 1:
            raise Blocked(f"BatchNorm '{path}' normalises another axis than the units'")
        batch_stats = mod.training or mod.running_mean is None
        kind = "channel"
    else:
        if tuple(mod.normalized_shape) != (n * r,) or t.axes[0] != nd - 1:  # type: ignore[attr-defined]
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
            flow.passive.append(_slice(f"{path}.{attr}", "passive", 0, tuple(val.shape), n, r,
                                       buffer=attr.startswith("running")))
    flow.path.append(path)
    return replace(t, normed=t.normed or batch_stats)


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


def _reshape(tr: Traced, flow: Flow, node: fx.Node, op: str, t: Track) -> Track:
    src = node.args[0]
    si, so = tr.shape(src), tr.shapes.get(node)
    if si is None or so is None:
        raise Blocked(f"unknown shapes around '{_label(node)}'")
    nd = len(si)
    if op in ("transpose", "permute", "t"):
        if op == "t" and node.op == "call_function" and node.target is getattr and node.args[1] == "T":
            perm = list(range(nd))[::-1]
        elif op == "t":
            perm = list(range(nd))
            perm[-1], perm[-2] = perm[-2], perm[-1]
        elif op == "transpose":
            a = list(node.args[1:3]) or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
            d0, d1 = int(a[0]) % nd, int(a[1]) % nd
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        else:
            dims = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 \
                else node.kwargs["dims"]
            perm = [int(d) % nd for d in dims]
        return replace(t, axes=tuple(perm.index(a) for a in t.axes))
    groups = _groups(si, so)

    def find(a: int) -> tuple[list[int], list[int]]:
        g = next(g for g in groups if a in g[0])
        return [d for d in g[0] if si[d] != 1 or d == a], [d for d in g[1] if so[d] != 1]

    if len(t.axes) == 1:
        a = t.axes[0]
        ie, oe = find(a)
        if ie == [a] and len(oe) == 1:
            return replace(t, axes=(oe[0],))
        if ie == [a] and len(oe) == 2 and t.repeat == 1:
            flow.block = so[oe[1]]
            return replace(t, axes=(oe[0], oe[1]))
        if ie and ie[0] == a and len(oe) == 1:
            return replace(t, axes=(oe[0],), repeat=t.repeat * math.prod(si[d] for d in ie[1:]))
        raise Blocked(f"'{_label(node)}' reshapes the units together with other axes")
    h, i = t.axes
    (ih, oh), (ii, oi) = find(h), find(i)
    if ih == [h, i] == ii and len(oh) == 1:
        return replace(t, axes=(oh[0],))
    if ih == [h] and ii == [i] and len(oh) == 1 and len(oi) == 1:
        return replace(t, axes=(oh[0], oi[0]))
    raise Blocked(f"'{_label(node)}' reshapes attention heads in an unsupported way")


def _shift(t: Track, by: int) -> Track:
    return replace(t, axes=tuple(a + by for a in t.axes))


def _binary(tr: Traced, flow: Flow, node: fx.Node, op: str, tracks: dict[fx.Node, Track]) -> Track:
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    so = tr.shapes.get(node)
    if so is None:
        raise Blocked(f"unknown shape of '{_label(node)}'")
    ta = tracks.get(a) if isinstance(a, fx.Node) else None
    tb = tracks.get(b) if isinstance(b, fx.Node) else None
    if ta is not None and tb is not None:
        ma, mb = _shift(ta, len(so) - _nd(tr, a)), _shift(tb, len(so) - _nd(tr, b))
        if ma != mb:
            raise Blocked(f"'{_label(node)}' combines the units with a rearranged copy of them")
        if op in ("mul", "div"):
            flow.restrict(_ELEM, f"'{_label(node)}' multiplies the units with themselves")
        flow.path.append(_label(node))
        return ma
    t, other, first = (ta, b, True) if ta is not None else (tb, a, False)
    assert t is not None
    src = a if first else b
    t = _shift(t, len(so) - _nd(tr, src))
    osh = tr.shape(other) if other is not None else ()
    if osh is None:
        raise Blocked(f"'{_label(node)}' with an operand of unknown shape")
    off = len(so) - len(osh)
    sizes = [osh[x - off] if x - off >= 0 else 1 for x in t.axes]
    label = _label(node)
    if all(s == 1 for s in sizes):
        if op in ("add", "sub"):
            flow.restrict(_ELEM, f"'{label}' adds a constant shift, which breaks homogeneity")
        elif op == "div" and not first:
            flow.restrict(_ELEM, f"'{label}' divides by the units")
        flow.path.append(label)
        return t
    if len(t.axes) == 2:
        raise Blocked(f"'{label}' combines attention heads with another tensor")
    dim = t.axes[0] - off
    per_unit = all(s == 1 for k, s in enumerate(osh) if k != dim)
    attr = tr.attr(other)
    n, r = flow.producer.n, t.repeat
    oname = getattr(other, "name", str(other))
    if attr is not None and per_unit:
        kind, name = attr
        if kind == "const":
            raise Blocked(f"'{label}' combines the units with a constant tensor, which does not "
                          "transform")
        sl = _slice(name, "passive", dim, osh, n, r, buffer=kind == "buffer")
        if op in ("add", "sub") and kind == "param":
            flow.cov.append(replace(sl, role="in"))
        elif op in ("add", "sub"):
            flow.restrict(_ELEM, f"'{label}' adds the fixed tensor '{name}' (a buffer, not a "
                                 "trainable parameter): it does not transform with the units")
            flow.passive.append(sl)
        else:
            flow.restrict(_DIAG if first else _ELEM, f"'{label}' scales the units by '{name}'")
            flow.passive.append(sl)
        flow.path.append(label)
        return t
    if op in ("add", "sub"):
        raise Blocked(f"residual add across the units: '{label}' adds them to '{oname}', "
                      "another stream that does not transform with them")
    flow.restrict(frozenset({"rescale", "sign"}) if first and op == "mul" else frozenset(),
                  f"'{label}' multiplies the units elementwise with '{oname}'")
    if not flow.classes:
        raise Blocked(f"'{label}' combines the units elementwise with '{oname}'")
    flow.path.append(label)
    return t


def _consume(flow: Flow, name: str, sl: ParamSlice, t: Track) -> None:
    flow.consumers.append((name, [sl], t.normed))


def _param_consumer(tr: Traced, flow: Flow, w: Any, t: Track, rows: bool, label: str) -> bool:
    pv = tr.param_view(w)
    if pv is None:
        return False
    name, flipped = pv
    shape = tr.shape(w)
    if shape is None or len(shape) != 2:
        raise Blocked(f"'{label}' with a weight that is not a matrix")
    dim = (0 if rows else 1) ^ int(flipped)
    wshape = tuple(shape[::-1] if flipped else shape)
    _consume(flow, name, _slice(name, "out", dim, wshape, flow.producer.n, t.repeat), t)
    return True


def _consume_linear(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track],
                    src: Any) -> None:
    if src not in tracks or len(tracks[src].axes) == 2 or tracks[src].axes[0] != _nd(tr, src) - 1:
        raise Blocked("F.linear over another axis than the units'")
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not _param_consumer(tr, flow, w, tracks[src], rows=False, label="linear"):
        raise Blocked("F.linear with a weight that is not a parameter")
    return None


def _matmul(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track | None:
    a, b = node.args[0], node.args[1]
    so = tr.shapes.get(node)
    ta = tracks.get(a) if isinstance(a, fx.Node) else None
    tb = tracks.get(b) if isinstance(b, fx.Node) else None
    if so is None or (ta is not None and tb is not None):
        raise Blocked("matmul of the units with themselves")
    t, src, side = (ta, a, "A") if ta is not None else (tb, b, "B")
    assert t is not None
    nd = _nd(tr, src)
    if nd < 2 or len(so) < 2:
        raise Blocked("matmul with a vector operand")
    contracted = nd - 1 if side == "A" else nd - 2
    if contracted not in t.axes:
        flow.path.append("matmul")
        return _shift(t, len(so) - nd)
    other = b if side == "A" else a
    if len(t.axes) == 1 and _param_consumer(tr, flow, other, t, rows=side == "A", label="matmul"):
        return None
    if tr.attr(other) is not None:
        raise Blocked("matmul of attention heads with a parameter")
    inner = t.axes[-1]
    if inner != contracted or (len(t.axes) == 2 and t.axes[0] >= nd - 2):
        raise Blocked("matmul contracts attention heads")
    flow.bilinear.append((node, side))
    return None


def _sdpa(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track | None:
    names = ("query", "key", "value")
    args = {k: (node.args[i] if len(node.args) > i else node.kwargs.get(k)) for i, k in enumerate(names)}
    hit = [k for k, v in args.items() if isinstance(v, fx.Node) and v in tracks]
    extra = [a for a in _args(node) if isinstance(a, fx.Node) and a in tracks
             and all(a is not v for v in args.values())]
    if len(hit) != 1 or extra:
        raise Blocked("scaled_dot_product_attention uses the units in several roles")
    k = hit[0]
    t = tracks[args[k]]
    nd = _nd(tr, args[k])
    if t.axes[-1] != nd - 1 or (len(t.axes) == 2 and t.axes[0] >= nd - 2):
        raise Blocked("scaled_dot_product_attention over another axis than the units'")
    if k == "value":
        flow.path.append("attention")
        return t
    flow.bilinear.append((node, "A" if k == "query" else "B"))
    return None
