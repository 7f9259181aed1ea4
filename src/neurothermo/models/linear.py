"""Deep linear networks, plain and embedded (docs/theory.md §3).

The embedded deep linear network is ``f(x) = M_out · W_D ⋯ W_1 · M_in · x`` with trainable ``W_k``
and fixed invertible ``M_in``, ``M_out`` (stand-ins for the layers around a linear block). Hidden
representations are ``h_k(x) = W_k ⋯ W_1 M_in x`` for k = 1 … D−1 (and the output of the last
trainable map, before ``M_out``).
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn


class DeepLinear(nn.Module):
    """``W_D ⋯ W_1 x`` with ``widths = (d_in, h_1, …, d_out)``; layers named ``layers.0 …``.

    Weights are drawn ``N(0, init_scale²/fan_in)``; biases (if any) start at 0.

    Args:
        widths: ``(d_in, h_1, …, d_out)``, at least two, each ≥ 1.
        bias: give every layer a bias.
        init_scale: the standard deviation of the weights times ``√fan_in``.
        generator: the random source of the initial weights; None: torch's global one.

    Raises:
        ValueError: fewer than two widths, or a width < 1.

    Example:
        >>> import torch
        >>> from neurothermo.models import DeepLinear
        >>> net = DeepLinear([3, 5, 5, 2], generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(4, 3)
        >>> w = net.layers[2].weight @ net.layers[1].weight @ net.layers[0].weight
        >>> torch.allclose(net(x), x @ w.T, atol=1e-6), [h.shape[1] for h in net.hidden(x)]
        (True, [5, 5])
    """

    def __init__(self, widths: Sequence[int], *, bias: bool = False, init_scale: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if len(widths) < 2 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must list at least 2 positive sizes, got {list(widths)}")
        linears = [nn.Linear(int(a), int(b), bias=bias) for a, b in pairwise(widths)]
        self.layers = nn.ModuleList(linears)
        with torch.no_grad():
            for layer in linears:
                std = init_scale / layer.in_features**0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                if layer.bias is not None:
                    layer.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def hidden(self, x: Tensor) -> list[Tensor]:
        """Representations after each trainable map except the last: ``[h_1, …, h_{D−1}]``."""
        out = []
        for layer in self.layers[:-1]:
            x = layer(x)
            out.append(x)
        return out


class EmbeddedDeepLinear(nn.Module):
    """``M_out · DeepLinear(widths) · M_in`` with ``M_in`` (widths[0] × d_in) and ``M_out`` fixed.

    ``M_in`` and ``M_out`` are buffers (copied), not parameters: only the ``W_k`` train.

    Args:
        m_in: ``(widths[0], d_in)``, the fixed map before the trainable block.
        widths: the trainable block's widths, as for :class:`DeepLinear` (no biases).
        m_out: ``(d_out, widths[-1])``, the fixed map after it.
        init_scale: as for :class:`DeepLinear`.
        generator: the random source of the initial weights; None: torch's global one.

    Raises:
        ValueError: ``m_in`` or ``m_out`` not matrices, shapes that do not chain, or bad widths.

    Example:
        >>> import torch
        >>> from neurothermo.models import EmbeddedDeepLinear
        >>> net = EmbeddedDeepLinear(torch.eye(3), [3, 4, 3], 2 * torch.eye(3))
        >>> sorted(n for n, _ in net.named_parameters())  # M_in and M_out are fixed
        ['body.layers.0.weight', 'body.layers.1.weight']
    """

    def __init__(self, m_in: Tensor, widths: Sequence[int], m_out: Tensor, *,
                 init_scale: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if m_in.ndim != 2 or m_out.ndim != 2:
            raise ValueError("m_in and m_out must be matrices")
        if m_in.shape[0] != widths[0] or m_out.shape[1] != widths[-1]:
            raise ValueError(
                f"shapes do not chain: M_in {tuple(m_in.shape)}, widths {list(widths)}, "
                f"M_out {tuple(m_out.shape)}"
            )
        self.register_buffer("m_in", m_in.clone())
        self.register_buffer("m_out", m_out.clone())
        self.body = DeepLinear(widths, init_scale=init_scale, generator=generator)

    m_in: Tensor
    m_out: Tensor

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x @ self.m_in.T) @ self.m_out.T
        return out

    def hidden(self, x: Tensor) -> list[Tensor]:
        """Hidden layers between two trainable maps, ``h_k = W_k ⋯ W_1 M_in x``, k = 1 … D−1.

        (The output of ``W_D`` feeds the fixed ``M_out``: no balance condition holds there, so it
        is not a hidden layer of docs/theory.md §3's claim.)
        """
        return self.body.hidden(x @ self.m_in.T)
