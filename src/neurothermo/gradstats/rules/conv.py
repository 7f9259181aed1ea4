"""``nn.Conv1d`` / ``nn.Conv2d`` via unfold: the weight is a Linear map on patches.

With ``P[i,l]`` the unfolded input patch at output position ``l`` (``in/G·k`` entries per group)
and ``δ[i,l]`` the output gradient there, ``c_i(W_g) = Σ_l δ_g[i,l] P_g[i,l]ᵀ`` per group ``g`` and
``c_i(bias) = Σ_l δ[i,l]``. Padding modes other than zeros and string paddings are applied to the
input first, exactly as the module does. Conv3d and transposed convolutions use the fallback.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from neurothermo.gradstats._pieces import Dense, Factored, Piece
from neurothermo.gradstats.rules._base import (
    Call,
    Rule,
    Unsupported,
    batch_first,
    register_rule,
)


def _pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    m = call.module
    assert isinstance(m, nn.Conv1d | nn.Conv2d)
    delta = deltas[0]
    if delta is None:
        return []
    nd = m.weight.dim() - 2
    x = batch_first(call.name, call.input(0), call.batch_size)
    if x.dim() != nd + 2:
        raise ValueError(f"module {call.name!r}: unbatched convolution input has no batch axis")
    b = call.batch_size
    weight, bias = call.param("weight"), call.param("bias")
    pieces = []
    if weight is not None:
        kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding: tuple[int, ...] = (0,) * nd
        else:
            padding = tuple(m.padding)
        if nd == 1:
            x = x.unsqueeze(-2)
            kernel, stride = (1, kernel[0]), (1, stride[0])
            dilation, padding = (1, dilation[0]), (0, padding[0])
        elif nd != 2:
            raise Unsupported(f"{nd}-d convolution")
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [b, C·K, L]
        g = m.groups
        length = cols.shape[-1]
        patches = cols.reshape(b, g, -1, length).mT  # [b, G, L, C/G·K]
        grads = delta.reshape(b, g, -1, length).mT  # [b, G, L, out/G]
        pieces.append(Piece(weight, Factored(grads, patches)))
    if bias is not None:
        pieces.append(Piece(bias, Dense(delta.reshape(b, delta.shape[1], -1).sum(-1))))
    return pieces


register_rule(nn.Conv1d, Rule(_pieces))
register_rule(nn.Conv2d, Rule(_pieces))
