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
from dataclasses import replace
from typing import Any

import torch.fx as fx
from torch import nn

from neurothermo.symmetry.base import ParamSlice
from neurothermo.symmetry.batched import tile_step
from neurothermo.symmetry.fused import (
    cat_step,
    check_plain,
    index_step,
    layout_check,
    segment_producers,
    split_step,
    tuple_step,
)
from neurothermo.symmetry.gain import gain_producer
from neurothermo.symmetry.ops import (
    addmm_step,
    binary_step,
    depthwise_columns,
    elementwise,
    linear_step,
    matmul_step,
    norm_step,
    prelu_slope,
    reshape_step,
)
from neurothermo.symmetry.recurrent import consumer_slices, layer_slices, rnn_layout
from neurothermo.symmetry.reduce import reduce_step
from neurothermo.symmetry.shared import (
    UNSUPPORTED,
    expand_step,
    repeat_step,
    sdpa_step,
    shared_columns,
    weights_times_value,
)
from neurothermo.symmetry.trace import Traced, module_op, op_name
from neurothermo.symmetry.units import (
    _CONV,
    _DIAG,
    _NORMS,
    _SCALES,
    Blocked,
    Flow,
    Fused,
    Producer,
    Track,
    clamp_op,
    flat_args,
    label,
    ndim_of,
    unit_slice,
    weight_slices,
)

__all__ = ["Flow", "Producer", "Track", "find_producers", "walk", "walk_all"]


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


def _rnn_producer(tr: Traced, node: fx.Node, path: str, mod: nn.RNNBase) -> Producer | None:
    lay = rnn_layout(mod)
    nd = ndim_of(tr, node.args[0])
    if isinstance(lay, str):
        return Producer(node, path, 0, Track((0,)), [], problem=f"'{path}': {lay} (opaque)")
    perm, sign = layer_slices(path, mod, mod.num_layers - 1)
    random_masks = bool(mod.dropout) and mod.training and mod.num_layers > 1
    allowed = frozenset({"sign"} if random_masks else {"sign", "perm"} if lay[1] is not None
                        else {"perm"})
    return Producer(node, path, mod.hidden_size, Track((nd - 1,), pick=0, strict=True), perm,
                    caveat=f"'{path}' ({type(mod).__name__}) has sigmoid/tanh gates",
                    allowed=allowed, sign_cov=sign)


def _producer(tr: Traced, node: fx.Node, shape: tuple[int, ...] | None) -> Producer | None:
    if node.op == "call_module":
        rnn = tr.gm.get_submodule(str(node.target))
        if isinstance(rnn, nn.RNNBase):
            return _rnn_producer(tr, node, str(node.target), rnn)
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
            cov, caveat = weight_slices(tr, path, mod, "in")
            if mod.bias is not None:
                cov.append(ParamSlice(p + "bias", "in", 0))
            track = last if isinstance(mod, nn.Linear) else Track((1,))
            prod = Producer(node, path, shape[track.axes[0]], track, cov)
            if caveat:
                prod.caveat = caveat + ": its rows can only be scaled through g"
            if isinstance(mod, _CONV) and mod.groups != 1:
                note = _GROUPED_ROWS.format(path=path)
                prod.caveat = f"{prod.caveat}; {note}" if prod.caveat else note
                prod.allowed = _SCALES
            return prod
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine and len(shape) >= 2:
            cov = [ParamSlice(p + "weight", "in", 0), ParamSlice(p + "bias", "in", 0)]
            return Producer(node, path, mod.num_features, Track((1,)), cov, diag=True)
        if isinstance(mod, nn.GroupNorm) and mod.affine and len(shape) >= 2:
            cov = [ParamSlice(p + "weight", "in", 0), ParamSlice(p + "bias", "in", 0)]
            return Producer(node, path, mod.num_channels, Track((1,)), cov, diag=True)
        if isinstance(mod, _NORMS) and len(mod.normalized_shape) == 1 and mod.weight is not None:
            cov = [ParamSlice(p + "weight", "in", 0)]
            if getattr(mod, "bias", None) is not None:
                cov.append(ParamSlice(p + "bias", "in", 0))
            return Producer(node, path, shape[-1], last, cov, diag=True)
        return None
    op = op_name(node)
    if op == "mul":  # a per-unit gain (Hugging Face RMSNorm's weight, see ``gain.py``)
        return gain_producer(tr, node, shape)
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
    if op == "addmm" and len(node.args) >= 3:  # bias + x @ W (Hugging Face Conv1D: W is [in, out])
        w = tr.param_view(node.args[2])
        if w is None or tr.param_view(node.args[1]) is not None:
            return None
        name = w[0].removesuffix(".weight")
        cov = [ParamSlice(w[0], "in", 0 if w[1] else 1)]
        b = tr.attr(node.args[0])
        if b is None or b[0] != "param" or tr.shape(node.args[0]) != (shape[-1],):
            return Producer(node, name, shape[-1], last, cov,
                            problem=f"'{name}': addmm adds a tensor that is not a bias parameter")
        cov.append(ParamSlice(b[1], "in", 0))
        return Producer(node, name, shape[-1], last, cov)
    return None


def walk(tr: Traced, prod: Producer) -> Flow:
    """Follow ``prod``'s units through every downstream operation (in graph order)."""
    flow = Flow(prod)
    if prod.problem:
        flow.blockers.append(prod.problem)
        return flow
    if prod.caveat:
        flow.restrict(prod.allowed if prod.allowed is not None else _DIAG, prod.caveat)
    tracks: dict[fx.Node, Track] = {prod.node: prod.track}
    flow.reached.add(prod.node)
    started = False
    for node in tr.gm.graph.nodes:
        if node is prod.node:
            started = True
            continue
        if not started or not any(isinstance(a, fx.Node) and a in tracks for a in flat_args(node)):
            continue
        flow.reached.add(node)
        try:
            new = _step(tr, flow, node, tracks)
        except Fused as err:
            flow.fused, flow.sizes = err.count, err.sizes
            break
        except Blocked as err:
            flow.blockers.append(str(err))
            mine = [tracks[a] for a in flat_args(node) if isinstance(a, fx.Node) and a in tracks]
            flow.blocked_normed = bool(mine) and all(t.normed for t in mine)
            break
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
            # an operation whose arguments these rules do not read: stop here, say so
            flow.blockers.append(f"operation '{node.name}' could not be followed "
                                 f"({type(err).__name__}: {err})")
            break
        if new is not None:
            tracks[node] = new
    return flow


def walk_all(tr: Traced, prod: Producer) -> list[Flow]:
    """``walk``, and for a fused layer one walk per segment (see ``fused.py``)."""
    flow = walk(tr, prod)
    if not flow.fused:
        return [flow]
    segs = segment_producers(prod, flow.fused, flow.sizes)
    if not segs:
        flow.blockers.append(f"its units are split into {flow.fused} segments in an unsupported "
                             "layout")
        return [flow]
    flows = [walk(tr, p) for p in segs]
    for f in flows:
        if f.fused:  # split again (a fused layer whose segments are shared heads): not followed
            f.blockers.append(f"its units are split into {flow.fused} segments and then into "
                              f"{f.fused}: nested segments are not followed")
    return flows


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
    mine = [tracks[a] for a in flat_args(node) if isinstance(a, fx.Node) and a in tracks]
    if op != "reshape" and any(t.copy_axis is not None for t in mine):
        raise Blocked(f"'{label(node)}' {UNSUPPORTED}")
    layout_check(node, op, mine)  # merged heads (batched.py), segments of uneven sizes
    if op == "repeat" and isinstance(src, fx.Node) and src in tracks:
        return tile_step(tr, node, tracks[src])
    if op == "getitem":
        if not (isinstance(src, fx.Node) and src in tracks):
            raise Blocked("the units are used as an index")
        t = tracks[src]
        return tuple_step(node, t) if t.pick is not None else index_step(tr, flow, node, t)
    if op in ("split", "chunk", "unbind") and isinstance(src, fx.Node) and src in tracks:
        check_plain(node, {src: replace(tracks[src], seg=None)})
        return split_step(tr, flow, node, op, tracks[src])
    if op == "cat":  # with empty tensors only (a key/value cache): segments pass unchanged
        if any(t.pick is not None for t in mine):
            raise Blocked(f"'{label(node)}' uses the layer's output tuple as a whole")
        return cat_step(tr, node, tracks)
    if op in ("expand", "repeat_interleave") and isinstance(src, fx.Node) and src in tracks \
            and tracks[src].pick is None:
        t = tracks[src]
        return expand_step(tr, node, t) if op == "expand" else repeat_step(tr, node, t)
    if op == "sdpa":
        return sdpa_step(tr, flow, node, tracks)
    if op in ("reshape", "transpose", "permute", "t", "identity") and isinstance(src, fx.Node) \
            and src in tracks and tracks[src].pick is None:
        return reshape_step(tr, flow, node, op, tracks[src]) if op != "identity" else tracks[src]
    if op == "matmul" and len(node.args) == 2:
        shared = weights_times_value(tr, node, tracks)
        if shared is not None:
            flow.path.append("attention")
            return shared
    check_plain(node, tracks)
    if op == "addmm":
        addmm_step(tr, flow, node, tracks)
        return None
    if op in ("add", "sub", "mul", "div"):
        return binary_step(tr, flow, node, op, tracks)
    if op == "matmul":
        return matmul_step(tr, flow, node, tracks)
    if op == "linear":
        linear_step(tr, flow, node, tracks, src)
        return None
    if not (isinstance(src, fx.Node) and src in tracks) or any(
        isinstance(a, fx.Node) and a in tracks for a in flat_args(node)[1:]
    ):
        raise Blocked(f"'{op}' uses the units in an unsupported argument position")
    track = tracks[src]
    if op in ("reshape", "transpose", "permute", "t"):
        return reshape_step(tr, flow, node, op, track)
    if op in ("mean", "sum", "vector_norm"):
        return reduce_step(tr, flow, node, op, track)
    if op == "dropout":
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return elementwise(tr, flow, "dropout" if (p and training) else "identity", track, node)
    if op in ("clamp", "clamp_min", "clamp_max"):
        op = clamp_op(node, op)
    if op == "hardtanh":
        lo: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi: Any = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        op = "hardtanh" if lo == -hi else "relu6"
    if op == "prelu":
        w = tr.attr(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        shape = tr.shape(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        if w is None or shape is None:
            raise Blocked("prelu with an unknown slope")
        prelu_slope(flow, w[1], math.prod(shape), track, buffer=w[0] != "param")
    return elementwise(tr, flow, op, track, node)


_GROUPED_ROWS = ("'{path}' is a grouped convolution: each output channel reads only its own "
                 "group's input channels, so its output channels can be scaled but not mixed or "
                 "permuted across groups")


def _module_step(tr: Traced, flow: Flow, node: fx.Node, tracks: dict[fx.Node, Track]) -> Track | None:
    path = str(node.target)
    mod = tr.gm.get_submodule(path)
    src: Any = node.args[0] if node.args else None
    others = [a for a in flat_args(node)[1:] if isinstance(a, fx.Node) and a in tracks]
    t0 = tracks.get(src) if isinstance(src, fx.Node) else None
    if isinstance(mod, nn.Linear) and t0 is not None and t0.seg is not None and not others \
            and t0.uneven is None \
            and t0.seg_axis is None and t0.pick is None and t0.axes == (ndim_of(tr, src) - 1,):
        slices, caveat = weight_slices(tr, path, mod, "out")
        if caveat:
            raise Blocked(f"{caveat}: its columns of one segment cannot be transformed alone")
        flow.consumers.append((path, shared_columns(flow, slices[0].name, t0, mod.in_features),
                               t0.normed))
        return None
    check_plain(node, tracks)
    if isinstance(mod, nn.RNNBase):
        t = tracks.get(src) if isinstance(src, fx.Node) else None
        if t is None or others or len(t.axes) == 2 or t.axes[0] != ndim_of(tr, src) - 1:
            raise Blocked(f"'{path}' ({type(mod).__name__}) uses the units in an unsupported way")
        slices = [unit_slice(c.name, "out", 1, tuple(mod.get_parameter(
            c.name.removeprefix(path + ".")).shape), flow.producer.n, t.repeat)
            for c in consumer_slices(path, mod)]
        flow.consumers.append((path, slices, t.normed))
        return None
    if isinstance(mod, nn.MultiheadAttention):
        qkv = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")]
        qkv = [a for a in qkv if a is not None]
        if len(qkv) != 3 or len({id(a) for a in qkv}) != 1 or src not in tracks:
            raise Blocked(f"'{path}' (MultiheadAttention) does not take the units as query, "
                          "key and value alike")
        t = tracks[src]
        if not mod._qkv_same_embed_dim or len(t.axes) == 2 or t.axes[0] != ndim_of(tr, src) - 1:
            raise Blocked(f"'{path}' (MultiheadAttention) layout not supported as a consumer")
        sl = unit_slice(f"{path}.in_proj_weight", "out", 1, tuple(mod.in_proj_weight.shape),
                    flow.producer.n, t.repeat)
        flow.consumers.append((path, [sl], t.normed))
        return None
    if not (isinstance(src, fx.Node) and src in tracks) or others:
        raise Blocked(f"'{path}' ({type(mod).__name__}) uses the units in an unsupported way")
    t = tracks[src]
    nd = ndim_of(tr, src)
    n, r = flow.producer.n, t.repeat
    if isinstance(mod, (nn.Linear, *_CONV)):
        axis = nd - 1 if isinstance(mod, nn.Linear) else 1
        if len(t.axes) == 2 or t.axes[0] != axis:
            raise Blocked(f"'{path}' does not contract the units' axis")
        if isinstance(mod, _CONV) and r != 1:
            raise Blocked(f"'{path}' convolves channels that hold several features per unit")
        slices, caveat = weight_slices(tr, path, mod, "out")
        shape = tuple(mod.get_parameter(slices[0].name.removeprefix(path + ".")).shape)
        if isinstance(mod, _CONV) and mod.groups != 1:
            slices = [depthwise_columns(flow, path, mod, slices[0].name, shape)]
        else:
            slices = [unit_slice(slices[0].name, "out", 1, shape, n, r)]
        if caveat:
            flow.restrict(frozenset({"sign", "perm"}), caveat + ": its columns cannot be scaled")
        flow.consumers.append((path, slices, t.normed))
        return None
    if isinstance(mod, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.RMSNorm | nn.GroupNorm):
        return norm_step(tr, flow, path, mod, t, nd)
    op = module_op(mod)
    if op is None:
        raise Blocked(f"opaque module '{path}' ({type(mod).__name__})")
    if op == "reshape":
        return reshape_step(tr, flow, node, op, t)
    if op == "dropout":
        p = getattr(mod, "p", 0.0)
        op = "dropout" if (p and mod.training) else "identity"
    if op == "softmax" and len(t.axes) == 2:
        raise Blocked("softmax over attention heads")
    if isinstance(mod, nn.PReLU):
        prelu_slope(flow, f"{path}.weight", mod.num_parameters, t)
    return elementwise(tr, flow, op, t, node)


