"""Double rotation (GL(d)): two linear maps with nothing nonlinear between them.

``W_{k+1}·W_k = (W_{k+1}G⁻¹)·(G W_k)`` for any invertible ``G``; a bias of the first map moves with
it (``b → G b``). Attention has one such pair per head: query–key (``q·kᵀ = (Gq)·(G⁻ᵀk)ᵀ``, both maps
covariant in torch's ``(out, in)`` layout, the key one with ``G⁻ᵀ``) and value–output. Charge
(docs/theory.md §2; torch layout, weights ``(out, in)``)::

    J = W_k W_kᵀ + b_k b_kᵀ − W_{k+1}ᵀ W_{k+1}              (value–output: W_V,h ⋯ − W_O,hᵀ W_O,h)
    J = W_Q,h W_Q,hᵀ + b_Q,h b_Q,hᵀ − W_K,h W_K,hᵀ − b_K,h b_K,hᵀ            (query–key, per head)
    SGD: J' = (1 − lr·wd)²·J + lr²·(same form in the gradients)

The group is not isometric; its orthogonal subgroup O(d) is (SGD never breaks it; GL(d) is broken
down to O(d) by the entropic force). ``diag(J)`` are the per-unit rescale charges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neurothermo.symmetry.base import ParamSlice, Symmetry, register_kind


@dataclass(frozen=True)
class DoubleRotationKind:
    name: str = "double_rotation"
    isometry: bool = False
    element_help: str = "an invertible block × block matrix per block"

    def check_element(self, sym: Symmetry, element: Tensor) -> Tensor:
        b, h = sym.block, sym.n_units // sym.block
        if tuple(element.shape) not in {sym.charge_shape, (h, b, b)} or not element.is_floating_point():
            raise ValueError(
                f"double_rotation element must be a float tensor of shape {sym.charge_shape} "
                f"(an invertible {b}×{b} matrix per block), got {tuple(element.shape)}"
            )
        g = element.reshape(h, b, b)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("double_rotation element contains NaN or Inf")
        _, info = torch.linalg.inv_ex(g)
        if bool((info != 0).any()):
            raise ValueError("double_rotation element is singular: every block must be invertible")
        return g

    def random_element(
        self, sym: Symmetry, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        b, h = sym.block, sym.n_units // sym.block
        a = torch.randn(h, b, b, generator=generator, dtype=torch.float64) * (0.5 / math.sqrt(b))
        g = torch.linalg.matrix_exp(a)  # invertible, condition number ≲ e²
        result: Tensor = g.reshape(sym.charge_shape).to(dtype=dtype, device=device)
        return result

    def act(self, sym: Symmetry, element: Tensor, role: str, m: Tensor) -> Tensor:
        if role == "passive":
            return m
        b, h = sym.block, sym.n_units // sym.block
        g = element.to(m.dtype)
        if role == "out":
            g = torch.linalg.inv(g).transpose(-1, -2)
        return (g @ m.reshape(h, b, -1)).reshape(m.shape)


DOUBLE_ROTATION = register_kind(DoubleRotationKind())


def random_orthogonal(sym: Symmetry, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A random element of the isometric subgroup O(block)^heads (for isometry checks)."""
    b, h = sym.block, sym.n_units // sym.block
    a = torch.randn(h, b, b, generator=generator, dtype=torch.float64)
    q = torch.linalg.matrix_exp(a - a.transpose(1, 2))
    result: Tensor = q.reshape(sym.charge_shape).to(dtype)
    return result


def attention_symmetries(path: str, mha: nn.MultiheadAttention) -> list[Symmetry]:
    """Per-head query–key and value–output double rotations of ``nn.MultiheadAttention``."""
    p = f"{path}." if path else ""
    e, h = mha.embed_dim, mha.num_heads
    dh = e // h
    has_bias = mha.in_proj_bias is not None
    if mha._qkv_same_embed_dim:
        wq = ParamSlice(p + "in_proj_weight", "in", 0, 0, e)
        wk = ParamSlice(p + "in_proj_weight", "out", 0, e, 2 * e)
        wv = ParamSlice(p + "in_proj_weight", "in", 0, 2 * e, 3 * e)
    else:
        wq = ParamSlice(p + "q_proj_weight", "in", 0)
        wk = ParamSlice(p + "k_proj_weight", "out", 0)
        wv = ParamSlice(p + "v_proj_weight", "in", 0)
    qk = [wq, wk]
    vo = [wv, ParamSlice(p + "out_proj.weight", "out", 1)]
    if has_bias:
        qk += [ParamSlice(p + "in_proj_bias", "in", 0, 0, e),
               ParamSlice(p + "in_proj_bias", "out", 0, e, 2 * e)]
        vo.append(ParamSlice(p + "in_proj_bias", "in", 0, 2 * e, 3 * e))
    if mha.bias_k is not None:
        qk.append(ParamSlice(p + "bias_k", "out", 2))
    if mha.bias_v is not None:
        vo.append(ParamSlice(p + "bias_v", "in", 2))
    name = path or "attention"
    heads = f"{h} heads × {dh}"
    return [
        Symmetry("double_rotation", f"{name}: query·keyᵀ per head ({heads})", tuple(qk), e, dh),
        Symmetry("double_rotation", f"{name}: value → out_proj per head ({heads})", tuple(vo), e, dh),
    ]
