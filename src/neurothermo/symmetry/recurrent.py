"""Symmetries of recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``).

A hidden unit ``j`` of a recurrent layer enters every gate's pre-activation through column ``j``
of ``W_hh`` and leaves through row ``j`` of each gate block. Two groups act on the hidden units
and leave the layer's function unchanged (with the initial state zero, the default):

* **permutation** ``P``: rows of every gate block of ``W_ih``, ``W_hh``, ``b_ih``, ``b_hh`` by ``P``
  (the gates of one unit move together), the columns of ``W_hh`` by ``P``, and the columns of
  whatever consumes the hidden states (the next layer's ``W_ih``, a head) by ``P``;
* **sign flip** ``D = diag(±1)``: rows of the one gate block through which the state enters
  oddly — LSTM: the cell candidate ``g`` (``c' = f⊙c + i⊙g``, ``h = o⊙tanh(c)``: flipping ``g``
  flips ``c`` and ``h``), GRU: the candidate ``n`` (``n = tanh(W_in x + b_in + r⊙(W_hn h + b_hn))``,
  ``h' = (1−z)⊙n + z⊙h``), tanh RNN: the only block — and the columns of ``W_hh`` (all gates)
  and of the consumers by ``D``. The sigmoid gates see ``W_hh D·D h = W_hh h`` unchanged.

Positive rescaling is not a symmetry (sigmoid and tanh are not homogeneous), except for ReLU RNNs,
which are not searched for it. Bidirectional layers and ``proj_size > 0`` are reported as opaque.
Both groups are isometries: no Noether charge.
"""
from __future__ import annotations

from torch import nn

from neurothermo.symmetry.base import ParamSlice, Symmetry

_GATES = {"LSTM": (4, 2), "GRU": (3, 2), "RNN_TANH": (1, 0), "RNN_RELU": (1, None)}


def rnn_layout(mod: nn.RNNBase) -> tuple[int, int | None] | str:
    """``(gate blocks, index of the odd block or None)``, or why the layer is opaque."""
    if mod.bidirectional:
        return "bidirectional recurrent layers are not analysed"
    if getattr(mod, "proj_size", 0):
        return "LSTM with proj_size > 0 is not analysed"
    if mod.mode not in _GATES:
        return f"recurrent mode {mod.mode} is not analysed"
    return _GATES[mod.mode]


def layer_slices(path: str, mod: nn.RNNBase, layer: int) -> tuple[list[ParamSlice], list[ParamSlice]]:
    """(permutation slices, sign-flip slices) of layer ``layer``'s own parameters."""
    lay = rnn_layout(mod)
    assert not isinstance(lay, str)
    g, odd = lay
    h = mod.hidden_size
    p = f"{path}." if path else ""
    w_ih, w_hh = f"{p}weight_ih_l{layer}", f"{p}weight_hh_l{layer}"
    n_in = mod.get_parameter(f"weight_ih_l{layer}").shape[1]
    perm = [ParamSlice(w_ih, "in", 1, view=(g, h, n_in)), ParamSlice(w_hh, "in", 1, view=(g, h, h)),
            ParamSlice(w_hh, "out", 1)]
    sign = [ParamSlice(w_ih, "in", 0, odd * h, (odd + 1) * h),
            ParamSlice(w_hh, "in", 0, odd * h, (odd + 1) * h),
            ParamSlice(w_hh, "out", 1)] if odd is not None else []
    if mod.bias:
        for b in (f"{p}bias_ih_l{layer}", f"{p}bias_hh_l{layer}"):
            perm.append(ParamSlice(b, "in", 1, view=(g, h)))
            if odd is not None:
                sign.append(ParamSlice(b, "in", 0, odd * h, (odd + 1) * h))
    return perm, sign


def inner_symmetries(path: str, mod: nn.RNNBase) -> list[Symmetry]:
    """Permutation and sign flip of every layer but the last (consumed by the next layer)."""
    if isinstance(rnn_layout(mod), str):
        return []
    p = f"{path}." if path else ""
    out: list[Symmetry] = []
    h = mod.hidden_size
    random_masks = bool(mod.dropout) and mod.training
    for layer in range(mod.num_layers - 1):
        perm, sign = layer_slices(path, mod, layer)
        nxt = ParamSlice(f"{p}weight_ih_l{layer + 1}", "out", 1)
        loc = f"{path or 'rnn'} layer {layer} → layer {layer + 1} ({h} units)"
        if sign:
            out.append(Symmetry("sign_flip", loc, (*sign, nxt), h))
        if not random_masks:  # dropout masks between layers are not permutation-equivariant
            out.append(Symmetry("permutation", loc, (*perm, nxt), h))
    return out


def consumer_slices(path: str, mod: nn.RNNBase) -> list[ParamSlice]:
    """The input weights' columns of the first layer (both directions)."""
    p = f"{path}." if path else ""
    names = ["weight_ih_l0"] + (["weight_ih_l0_reverse"] if mod.bidirectional else [])
    return [ParamSlice(p + n, "out", 1) for n in names]
