"""``nn.Conv1d`` / ``nn.Conv2d``: the weight is a Linear map on input patches.

With ``P[i,l]`` the input patch under output position ``l`` (``k·in/G`` entries per group ``g``)
and ``δ[i,l]`` the output gradient there, ``c_i(W_g) = Σ_l δ_g[i,l] P_g[i,l]ᵀ`` and
``c_i(bias) = Σ_l δ[i,l]``. Patches are gathered channels-last with ``Tensor.unfold`` (one copy;
several times faster on CPU than ``F.unfold``'s im2col) in (kernel, channel) column order, which
the piece records for materialising. Padding modes other than zeros and string paddings are
applied exactly as the module does. Conv3d and transposed convolutions use the fallback.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from neurothermo.gradstats._pieces import Dense, Factored, Piece
from neurothermo.gradstats.rules._base import Call, Rule, batch_first, register_rule


def patches(m: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``[b, G, L, kh·kw·C/G]`` patches of ``x`` ([b, C, (H,) W]) and their column shape."""
    nd = m.weight.dim() - 2
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    elif any(m.padding):
        x = F.pad(x, [p for p in reversed(m.padding) for _ in range(2)])
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    if nd == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    b, c = x.shape[:2]
    g = m.groups
    xc = x.permute(0, 2, 3, 1).contiguous()  # channels last: [b, Hp, Wp, C], C innermost
    win = [dilation[i] * (kernel[i] - 1) + 1 for i in range(2)]
    w = xc.unfold(1, win[0], stride[0]).unfold(2, win[1], stride[1])  # [b, Ho, Wo, C, wh, ww]
    w = w[..., ::dilation[0], ::dilation[1]]  # [b, Ho, Wo, C, kh, kw]
    ho, wo = w.shape[1:3]
    k = kernel[0] * kernel[1]
    p = w.permute(0, 1, 2, 4, 5, 3).reshape(b, 1, ho * wo, k * c)  # one copy, C innermost
    if g > 1:
        p = p.reshape(b, ho * wo, k, g, c // g).permute(0, 3, 1, 2, 4).reshape(b, g, ho * wo, -1)
    return p, (kernel[0], kernel[1], c // g)


def _pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    m = call.module
    assert isinstance(m, nn.Conv1d | nn.Conv2d)
    delta = deltas[0]
    if delta is None:
        return []
    x = batch_first(call.name, call.input(0), call.batch_size)
    if x.dim() != m.weight.dim():
        raise ValueError(f"module {call.name!r}: unbatched convolution input has no batch axis")
    b, g = call.batch_size, m.groups
    weight, bias = call.param("weight"), call.param("bias")
    pieces = []
    if weight is not None:
        cols, shape = patches(m, x)
        grads = delta.reshape(b, g, delta.shape[1] // g, -1).mT  # [b, G, L, out/G]
        # columns (kh, kw, C/G) → the weight's (C/G, kh, kw)
        pieces.append(Piece(weight, Factored(grads, cols, (shape, (2, 0, 1)))))
    if bias is not None:
        pieces.append(Piece(bias, Dense(delta.reshape(b, delta.shape[1], -1).sum(-1))))
    return pieces


register_rule(nn.Conv1d, Rule(_pieces))
register_rule(nn.Conv2d, Rule(_pieces))
