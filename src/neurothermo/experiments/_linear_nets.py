"""Embedded deep linear nets, batched over independent chains, and the kernels their equilibria predict.

A net is ``f(x) = M_out·W_D ⋯ W_1·M_in·x`` with trainable ``W_k`` and fixed invertible ``M_in``,
``M_out``; ``C`` independent copies ("chains") are stored as one ``(C, d_out, d_in)`` stack per map.
Loss ``(1/(2b)) Σ_i ‖f(x_i) − y_i‖²`` over a batch of ``b``. The kernels below are what matrix
balance between neighbouring maps predicts for the Gram matrix ``h_k(x₁)ᵀh_k(x₂) = x₁ᵀKx₂`` of a
hidden layer ``h_k = W_k ⋯ W_1 M_in x`` (up to scale):

* independent label noise (``Cov ε = Σ_ε``, labels ``y = Vx + ε``): stationarity of the charge
  ``W_kW_kᵀ − W_{k+1}ᵀW_{k+1}`` under SGD needs ``E[g_k g_kᵀ] = E[g_{k+1}ᵀg_{k+1}]``; at a minimum
  the residual is ``−ε``, so ``E[h_k h_kᵀ] ∝ S_kᵀ Σ_ε S_k`` (``S_k``: hidden layer k → output) and
  ``K Σ_x K ∝ Vᵀ Σ_ε V``, i.e. ``K* = platonic_kernel(Σ_x, V, Σ_ε)``;
* labels ``Ty`` (teacher ``TV``, noise ``TΣ_εTᵀ``): ``K_T Σ_x K_T ∝ VᵀTᵀTΣ_εTᵀTV``, equal to K*
  iff ``TᵀT ∝ I``;
* noise ``ε = √s(x)·ξ`` with ``Cov ξ = Σ_ε``, ``E s = 1``: the two sides weight inputs by ``s``, so
  ``Σ_x`` is replaced by ``E[s(x) x xᵀ]`` (:func:`noise_weighted_covariance`);
* weight decay strong enough to null the charges (``W_kW_kᵀ = W_{k+1}ᵀW_{k+1}``): ``A_kᵀA_k =
  (PᵀP)^{k/D}`` for the product ``P = W_D⋯W_1``, so ``K_k = M_inᵀ(PᵀP)^{k/D}M_in``, a kernel that
  depends on the layer, the depth and ``M_in`` (:func:`balanced_kernel`).
"""
from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import Tensor

Chains = list[Tensor]  # one (C, d_out, d_in) stack per trainable map


def well_conditioned(d: int, g: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """A random rotation times singular values spread over [0.8, 1.3] (invertible, condition 1.6)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    out: Tensor = q @ torch.diag(torch.linspace(1.3, 0.8, d, dtype=dtype))
    return out


def init_chains(widths: tuple[int, ...], chains: int, scale: float, g: torch.Generator) -> Chains:
    """``W_k ~ N(0, scale²/d_in)`` for every chain."""
    return [torch.randn(chains, b, a, generator=g, dtype=torch.float64) * scale / math.sqrt(a)
            for a, b in pairwise(widths)]


def hidden(Ws: Chains, m_in: Tensor, x: Tensor) -> list[Tensor]:
    """``h_k = W_k ⋯ W_1 M_in x`` for k = 1 … D−1; ``x``: ``(n, d)``; each output ``(C, n, width)``."""
    z = (x @ m_in.T).expand(Ws[0].shape[0], -1, -1)
    out = []
    for W in Ws[:-1]:
        z = z @ W.transpose(1, 2)
        out.append(z)
    return out


def sgd_grads(Ws: Chains, m_in: Tensor, m_out: Tensor, x: Tensor, y: Tensor) -> Chains:
    """Gradients of ``(1/(2b)) Σ_i ‖M_out W_D⋯W_1 M_in x_i − y_i‖²`` for every chain.

    ``x``: ``(C, b, d_in)``, ``y``: ``(C, b, d_out)`` (row-vector layout); manual backpropagation
    through the product, tested against autograd.
    """
    b = x.shape[1]
    zs = [x @ m_in.T]
    for W in Ws:
        zs.append(zs[-1] @ W.transpose(1, 2))
    delta = (zs[-1] @ m_out.T - y) @ m_out / b
    grads: Chains = [torch.empty(0)] * len(Ws)
    for k in range(len(Ws) - 1, -1, -1):
        grads[k] = delta.transpose(1, 2) @ zs[k]
        delta = delta @ Ws[k]
    return grads


def product(Ws: Chains) -> Tensor:
    """``P = W_D ⋯ W_1`` per chain, ``(C, d_out, d_in)``."""
    P = Ws[0]
    for W in Ws[1:]:
        P = W @ P
    return P


def population_loss(Ws: Chains, m_in: Tensor, m_out: Tensor, v: Tensor, sigma_x: Tensor) -> Tensor:
    """``½ tr((P − V)Σ_x(P − V)ᵀ)`` summed over chains, ``P = M_out W_D⋯W_1 M_in`` (+ const).

    ``v``: ``(d, d)`` or one teacher per chain ``(C, d, d)``.
    """
    E = m_out @ product(Ws) @ m_in - v
    return 0.5 * (E @ sigma_x @ E.transpose(1, 2)).diagonal(dim1=1, dim2=2).sum()


def charges(Ws: Chains) -> list[Tensor]:
    """``W_kW_kᵀ − W_{k+1}ᵀW_{k+1}`` for every pair of neighbouring maps, ``(C, width, width)``."""
    return [a @ a.transpose(1, 2) - b.transpose(1, 2) @ b for a, b in pairwise(Ws)]


def balanced_kernel(m_in: Tensor, P: Tensor, k: int, depth: int) -> Tensor:
    """``M_inᵀ (PᵀP)^{k/D} M_in``: the Gram kernel of hidden layer ``k`` of a balanced factorisation.

    Balanced (``W_{j+1}ᵀW_{j+1} = W_jW_jᵀ`` for all j, the fixed point of weight decay) gives
    ``(W_k⋯W_1)ᵀ(W_k⋯W_1) = (W_1ᵀW_1)^k`` and ``PᵀP = (W_1ᵀW_1)^D``. ``P``: ``(…, d_out, d_in)``
    (the product of the trainable maps only); returns ``(…, d_in, d_in)``.
    """
    if not 1 <= k < depth:
        raise ValueError(f"k must be a hidden layer 1 … {depth - 1}, got {k}")
    w, u = torch.linalg.eigh(P.transpose(-1, -2) @ P)
    power = (u * w.clamp_min(0.0).pow(k / depth).unsqueeze(-2)) @ u.transpose(-1, -2)
    out: Tensor = m_in.T @ power @ m_in
    return out


def window_scale(z: Tensor, width: float) -> Tensor:
    """``s(z) = √(1 + 1/w²)·exp(−z²/(2w²))``: label-noise variance factor, ``E s(z) = 1`` for z ~ N(0, 1).

    Concentrates the label noise on inputs near the hyperplane ``aᵀx = 0`` (``z = aᵀx/√(aᵀΣ_xa)``).
    """
    return math.sqrt(1.0 + 1.0 / width**2) * torch.exp(-z.square() / (2 * width**2))


def noise_weighted_covariance(sigma_x: Tensor, a: Tensor, width: float) -> Tensor:
    """``E[s(z) x xᵀ] = Σ_x + (E[z²s(z)] − 1)·Σ_x a aᵀ Σ_x / (aᵀΣ_x a)`` for Gaussian x, with
    ``E[z² s(z)] = w²/(1 + w²)`` for :func:`window_scale` (x splits into its part along ``Σ_xa``,
    a function of z only, and an independent rest)."""
    c = width**2 / (1.0 + width**2)
    sa = sigma_x @ a
    return sigma_x + (c - 1.0) * torch.outer(sa, sa) / (a @ sa)
