"""Small MLPs batched over independent chains (``C`` copies in one tensor per layer), for experiments
that train many seeds side by side. Layer k: ``z ↦ act(z W_kᵀ + b_k)``; the last layer is linear."""
from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor

Params = list[tuple[Tensor, Tensor]]  # (W: (C, out, in), b: (C, 1, out)) per layer
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"tanh": torch.tanh, "relu": torch.relu}


def init_mlp(widths: tuple[int, ...], chains: int, scale: float, g: torch.Generator,
             dtype: torch.dtype = torch.float64) -> Params:
    """``W ~ N(0, scale²/fan_in)``, biases 0, for every chain."""
    return [(torch.randn(chains, b, a, generator=g, dtype=dtype) * scale / math.sqrt(a),
             torch.zeros(chains, 1, b, dtype=dtype)) for a, b in pairwise(widths)]


def forward(params: Params, x: Tensor, act: str) -> tuple[Tensor, list[Tensor]]:
    """Output ``(C, n, d_out)`` and the hidden activations (one ``(C, n, width)`` per hidden layer).

    ``x``: ``(C, n, d_in)`` or ``(n, d_in)`` (the same inputs for every chain).
    """
    f = ACTIVATIONS[act]
    z = x if x.ndim == 3 else x.expand(params[0][0].shape[0], -1, -1)
    hs = []
    for k, (W, b) in enumerate(params):
        z = z @ W.transpose(1, 2) + b
        if k < len(params) - 1:
            z = f(z)
            hs.append(z)
    return z, hs


def mse_step(params: Params, x: Tensor, y: Tensor, act: str, lr: float) -> Params:
    """One step of ``θ ← θ − lr·∇θ Σ_chains (1/(2n)) Σ_i ‖f(x_i) − y_i‖²`` (each chain its own mean
    over its ``n`` samples, so chains do not interact)."""
    leaves = [t.detach().requires_grad_(True) for p in params for t in p]
    pairs = list(zip(leaves[0::2], leaves[1::2]))
    out, _ = forward(pairs, x, act)
    loss = 0.5 * (out - y).square().sum(-1).mean(-1).sum()
    grads = torch.autograd.grad(loss, leaves)
    new = [(t - lr * gt).detach() for t, gt in zip(leaves, grads)]
    return list(zip(new[0::2], new[1::2]))
