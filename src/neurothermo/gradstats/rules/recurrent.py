"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: exact per-sample gradients of the gate weights.

Each gate pre-activation at step ``t`` is ``z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``, so with
``δ_t = ∂l/∂z_t`` (one sample) ``c(W_ih) = Σ_t δ_t x_tᵀ``, ``c(W_hh) = Σ_t δ_t h_{t-1}ᵀ`` and both
biases get ``Σ_t δ_t``: Linear pieces with the time steps as positions (squared norms by the Gram
form ``Σ_{t,s}(δ_t·δ_s)(x_t·x_s)``). GRU's candidate gate is ``n_t = tanh(W_in x_t + b_in +
r_t ⊙ (W_hn h_{t-1} + b_hn))``: its recurrent rows get ``δ_t ⊙ r_t`` instead of ``δ_t``.

The gate deltas are not visible from outside a fused RNN kernel. While recording, each layer and
direction is run as ``X = x W_ihᵀ + b_ih`` (one Linear over the whole sequence, whose output
gradient is ``δ`` at every step) followed by the same fused kernel (torch's, cuDNN's) on ``X``
with an identity input weight and a zero input bias: the kernel computes exactly the module's
recurrence, and the backward of the mean loss hands ``δ_t`` for all steps at once. ``h_{t-1}`` is
the kernel's output shifted by one step. Layers, ``bidirectional`` (the reverse direction runs on
the time-flipped sequence), ``batch_first``, an initial state and inter-layer dropout (train mode,
drawn as torch does, not bit-identical) follow torch's semantics. ``proj_size > 0`` uses the
fallback; packed sequences and unbatched input are refused with the way out.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils.rnn import PackedSequence

from neurothermo.gradstats._pieces import Dense, Factored, Piece
from neurothermo.gradstats.rules._base import (
    Call,
    PerSampleUnsupportedError,
    Rule,
    Sink,
    Use,
    batch_first,
    register_rule,
)

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _kernel(mode: str, xproj: Tensor, hx: Any, w_hh: Tensor, b_hh: Tensor, training: bool
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One unidirectional layer of the fused kernel on pre-projected input ``xproj`` [b, T, GH]."""
    gh = xproj.shape[-1]
    eye = torch.eye(gh, dtype=xproj.dtype, device=xproj.device)
    weights = [eye, w_hh, xproj.new_zeros(gh), b_hh]
    with warnings.catch_warnings():  # cuDNN: "weights are not part of single contiguous chunk"
        warnings.simplefilter("ignore", UserWarning)
        if mode == "LSTM":
            out, h, c = _VF.lstm(xproj, hx, weights, True, 1, 0.0, training, False, True)
            return out, h, c
        fn = {"GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}[mode]
        out, h = fn(xproj, hx, weights, True, 1, 0.0, training, False, True)
        return out, h, None


def _record(sink: Sink, name: str, mode: str, x: Tensor, xproj: Tensor, h_prev: Tensor,
            w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> None:
    """A use whose output gradient (at ``xproj``) gives the pieces of one layer and direction."""
    wanted = {id(p) for p in (w_ih, w_hh, b_ih, b_hh) if p is not None and id(p) in sink.wanted}
    if not wanted or not xproj.requires_grad:
        return
    b = sink.batch_size

    def compute(deltas: list[Tensor | None]) -> list[Piece]:
        d = deltas[0]
        if d is None:
            return []
        batch_first(name, d, b, "output gradient")
        d_rec = d
        if mode == "GRU":  # the candidate gate's recurrent part is scaled by the reset gate r_t
            hid = w_hh.shape[1]
            hw = F.linear(h_prev, w_hh, b_hh)
            r = torch.sigmoid(xproj[..., :hid] + hw[..., :hid])
            d_rec = torch.cat([d[..., :2 * hid], d[..., 2 * hid:] * r], -1)
        pieces = []
        for w, u, v in ((w_ih, d, x), (w_hh, d_rec, h_prev)):
            if id(w) in wanted:
                pieces.append(Piece(w, Factored(u.unsqueeze(1), v.unsqueeze(1))))
        for c, u in ((b_ih, d), (b_hh, d_rec)):
            if c is not None and id(c) in wanted:
                pieces.append(Piece(c, Dense(u.sum(1))))
        return pieces

    sink.add(Use(name, [get_gradient_edge(xproj)], compute, [x], frozenset(wanted)))


def _forward(m: nn.Module, name: str, sink: Sink, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
    assert isinstance(m, nn.RNNBase)
    if not sink.active:
        return type(m).forward(m, *args, **kwargs)
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if isinstance(x, PackedSequence):
        raise PerSampleUnsupportedError(
            f"module {name!r} ({type(m).__name__}) got a PackedSequence: per-sample gradients of "
            "packed recurrent input are not supported. Pass the padded batch-first tensor (and "
            "mask the padded steps in the loss or read the output at each sample's last step)."
        )
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise PerSampleUnsupportedError(f"module {name!r}: unbatched {type(m).__name__} input has no batch axis")
    mode, hid = m.mode, m.hidden_size
    layers, dirs = m.num_layers, 2 if m.bidirectional else 1
    xb = x if m.batch_first else x.transpose(0, 1)
    if sink.clone:
        xb = xb.clone()
    b = batch_first(name, xb, sink.batch_size).shape[0]
    if hx is None:
        h0 = xb.new_zeros(layers * dirs, b, hid)
        c0 = xb.new_zeros(layers * dirs, b, hid) if mode == "LSTM" else None
    else:
        h0, c0 = hx if mode == "LSTM" else (hx, None)
    layer_in = xb
    hn: list[Tensor] = []
    cn: list[Tensor] = []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
            b_ih = getattr(m, "bias_ih" + sfx) if m.bias else None
            b_hh = getattr(m, "bias_hh" + sfx) if m.bias else None
            inp = layer_in.flip(1) if d else layer_in
            xproj = F.linear(inp, w_ih, b_ih)
            h_k = h0[k:k + 1]
            state = (h_k, c0[k:k + 1]) if c0 is not None else h_k
            out, h, c = _kernel(mode, xproj, state, w_hh,
                                b_hh if b_hh is not None else xproj.new_zeros(xproj.shape[-1]),
                                m.training)
            h_prev = torch.cat([h_k.transpose(0, 1), out[:, :-1]], 1)
            _record(sink, name, mode, inp, xproj, h_prev, w_ih, w_hh, b_ih, b_hh)
            outs.append(out.flip(1) if d else out)
            hn.append(h)
            if c is not None:
                cn.append(c)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, -1)
        if layer < layers - 1 and m.dropout > 0 and m.training:
            layer_in = F.dropout(layer_in, m.dropout, True)
    output = layer_in if m.batch_first else layer_in.transpose(0, 1)
    h_n = torch.cat(hn, 0)
    return (output, (h_n, torch.cat(cn, 0))) if mode == "LSTM" else (output, h_n)


def _no_pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    raise AssertionError("recurrent modules record their gates from their forward")


def _applies(m: nn.Module) -> bool:
    return isinstance(m, nn.RNNBase) and m.mode in _GATES and getattr(m, "proj_size", 0) == 0


for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_rule(_cls, Rule(_no_pieces, forward=_forward, applies=_applies))
