"""``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``: the weight is a Linear map on input patches.

With ``P[i,l]`` the input patch under output position ``l`` (``n = k·in/G`` entries per group) and
``δ[i,l]`` the output gradient there (``m = out/G`` entries), ``c_i(W_g) = Σ_l δ_g[i,l] P_g[i,l]ᵀ``
and ``c_i(bias) = Σ_l δ[i,l]``. Two exact routes, the cheaper by flop count (L positions):

* Gram (``L(m+n) < m·n``: deep layers, small feature maps): ``Σ_{l,l'} (δ_l·δ_l')(P_l·P_l')`` from
  channels-last patches (1-d and 2-d), never forming per-sample weight gradients;
* otherwise the per-sample weight gradients themselves, for all samples at once as ONE grouped
  convolution backward with the samples as groups (what mkldnn/cuDNN do fastest), in chunks of the
  batch that bound the memory.

Padding modes other than zeros and string paddings are applied exactly as the module does.
Transposed convolutions use the fallback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurothermo.gradstats._pieces import Dense, Factored, Piece, chunked
from neurothermo.gradstats.rules._base import (
    Call,
    PerSampleUnsupportedError,
    Rule,
    batch_first,
    register_rule,
)

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _padded(m: Conv, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` with the module's padding applied where conv itself cannot, and the rest."""
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return F.pad(x, m._reversed_padding_repeated_twice, mode=mode), (0,) * (x.dim() - 2)
    return x, tuple(m.padding)


@dataclass(frozen=True)
class ConvWeightGrad:
    """Per-sample conv weight gradients by one grouped convolution backward (samples as groups).

    ``x``: padded input ``[b, C, *s]``; ``delta``: output gradient ``[b, O, *s']``.
    """

    x: Tensor
    delta: Tensor
    weight: Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def _grads(self, x: Tensor, delta: Tensor) -> Tensor:
        n = x.shape[0]
        w = self.weight.detach().repeat(n, *(1,) * (self.weight.dim() - 1))
        gw = torch.ops.aten.convolution_backward(
            delta.reshape(1, -1, *delta.shape[2:]), x.reshape(1, -1, *x.shape[2:]), w, None,
            list(self.stride), list(self.padding), list(self.dilation), False,
            [0] * len(self.stride), n * self.groups, [False, True, False])[1]
        result: Tensor = gw.reshape(n, -1)
        return result

    def sq_norm(self) -> Tensor:
        return chunked(lambda x, d: self._grads(x, d).square().sum(1), (self.x, self.delta),
                       2 * self.weight.numel(), self.x.shape[0])

    def materialize(self) -> Tensor:
        return chunked(self._grads, (self.x, self.delta), 2 * self.weight.numel(),
                       self.x.shape[0])


def patches(m: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``[b, G, L, kh·kw·C/G]`` patches of ``x`` ([b, C, (H,) W]) and their column shape."""
    x, padding = _padded(m, x)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    if m.weight.dim() == 3:
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
    assert isinstance(m, Conv)
    delta = deltas[0]
    if delta is None:
        return []
    x = batch_first(call.name, call.input(0), call.batch_size)
    if x.dim() != m.weight.dim():
        raise PerSampleUnsupportedError(f"module {call.name!r}: unbatched convolution input has no batch axis")
    b, g = call.batch_size, m.groups
    weight, bias = call.param("weight"), call.param("bias")
    pieces = []
    if weight is not None:
        length = math.prod(delta.shape[2:])
        rows, cols = weight.shape[0] // g, weight[0].numel()
        if length * (rows + cols) < rows * cols and weight.dim() <= 4:
            p, shape = patches(m, x)  # type: ignore[arg-type]
            grads = delta.reshape(b, g, rows, length).mT  # [b, G, L, out/G]
            # columns (kh, kw, C/G) → the weight's (C/G, kh, kw)
            pieces.append(Piece(weight, Factored(grads, p, (shape, (2, 0, 1)))))
        else:
            xp, padding = _padded(m, x)
            pieces.append(Piece(weight, ConvWeightGrad(xp, delta, weight, tuple(m.stride),
                                                       padding, tuple(m.dilation), g)))
    if bias is not None:
        pieces.append(Piece(bias, Dense(delta.reshape(b, delta.shape[1], -1).sum(-1))))
    return pieces


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_cls, Rule(_pieces))
