"""``nn.MultiheadAttention`` through its projections.

torch's forward uses ``in_proj_weight`` inside ``F.multi_head_attention_forward``, out of reach of
module hooks. While recording, the module's forward is replaced by the same computation written
with explicit projections (``q = query W_qᵀ + b_q`` …, attention, ``out = o W_oᵀ + b_o``), so that
each projection is a Linear use: ``in_proj_weight`` gets three Factored pieces on its q/k/v row
blocks (one packed piece for self-attention), ``out_proj`` one piece, ``bias_k``/``bias_v`` the
output gradient at their appended key/value position. Masks (bool or float, 2-D or 3-D), key
padding, ``is_causal``, ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``, ``batch_first`` and
dropout follow torch's semantics. With ``create_graph`` the attention is computed explicitly
(torch's CPU fused kernel has no double backward).
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from neurothermo.gradstats._pieces import Dense, Piece
from neurothermo.gradstats.rules._base import (
    Call,
    PerSampleUnsupportedError,
    Rule,
    Sink,
    Use,
    batch_first,
    register_rule,
)
from neurothermo.gradstats.rules.linear import linear_pieces

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _linear_use(sink: Sink, name: str, a: Tensor, weight: Tensor | None, bias: Tensor | None,
                weight_rows: tuple[int, int] | None, bias_rows: tuple[int, int] | None
                ) -> Tensor:
    """``F.linear(a, weight[rows], bias[rows])``, recorded as a Linear use of the parameters."""
    assert weight is not None
    w = weight if weight_rows is None else weight[weight_rows[0]:weight_rows[1]]
    c = None if bias is None else (bias if bias_rows is None else bias[bias_rows[0]:bias_rows[1]])
    out = F.linear(a, w, c)
    wanted_w = weight if id(weight) in sink.wanted else None
    wanted_b = bias if bias is not None and id(bias) in sink.wanted else None
    if (wanted_w is not None or wanted_b is not None) and out.requires_grad:
        b = sink.batch_size

        def compute(deltas: list[Tensor | None]) -> list[Piece]:
            if deltas[0] is None:
                return []
            return linear_pieces(name, a, deltas[0], wanted_w, wanted_b, b,
                                 weight_rows=weight_rows, bias_rows=bias_rows)

        ids = frozenset(id(p) for p in (wanted_w, wanted_b) if p is not None)
        # A view written in place later is rebased by autograd (its edge would get no
        # gradient): watched, so the pass is redone with a copy (see _capture.py).
        view = out._base is not None
        sink.add(Use(name, [get_gradient_edge(out)], compute, [a, out] if view else [a], ids))
        if view and sink.clone:
            return out.clone()
    return out


def _kv_bias_use(sink: Sink, name: str, seq: Tensor, param: Tensor | None) -> Tensor:
    """Append ``param`` ([1, 1, E]) as one more position of ``seq`` ([b, S, E])."""
    if param is None:
        return seq
    b = seq.shape[0]
    out = torch.cat([seq, param.expand(b, 1, -1)], 1)
    if id(param) in sink.wanted:
        def compute(deltas: list[Tensor | None]) -> list[Piece]:
            d = deltas[0]
            return [] if d is None else [Piece(param, Dense(d[:, -1:, :].unsqueeze(1)))]

        sink.add(Use(name, [get_gradient_edge(out)], compute, [], frozenset({id(param)})))
    return out


def _forward(m: nn.Module, name: str, sink: Sink, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
    assert isinstance(m, nn.MultiheadAttention)
    if not sink.active:
        return type(m).forward(m, *args, **kwargs)
    bound = _SIGNATURE.bind(m, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    need_weights, is_causal = a["need_weights"], a["is_causal"]
    if query.dim() != 3:
        raise PerSampleUnsupportedError(f"module {name!r}: unbatched MultiheadAttention input has no batch axis")
    # Batch-first views that keep torch's identity tests (self- vs cross-attention).
    same_kv, same_qk = key is value, query is key
    if sink.clone:
        query = query.clone()
        key = query if same_qk else key.clone()
        value = key if same_kv else value.clone()
    q_in, k_in, v_in = (t if m.batch_first else t.transpose(0, 1) for t in (query, key, value))
    if same_qk:
        k_in = q_in
    if same_kv:
        v_in = k_in
    b, tgt, e = q_in.shape
    batch_first(name, q_in, sink.batch_size, "query")
    h, hd = m.num_heads, m.head_dim

    kpm = F._canonical_mask(mask=a["key_padding_mask"], mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(a["attn_mask"]),
                            other_name="attn_mask", target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=a["attn_mask"], mask_name="attn_mask", other_type=None,
                                  other_name="", target_type=query.dtype, check_other=False)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch requires).")
    if is_causal and kpm is None and not need_weights:
        attn_mask = None  # torch then lets the kernel apply the causal mask
    elif kpm is not None:
        is_causal = False

    # In-projections, recorded as Linear uses of row blocks of the packed weight.
    bias = m.in_proj_bias
    blocks = [(0, e), (e, 2 * e), (2 * e, 3 * e)]
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight
        if q_in is k_in and k_in is v_in:
            q, k, v = torch.split(_linear_use(sink, name, q_in, w, bias, None, None), e, -1)
        elif k_in is v_in:
            q = _linear_use(sink, name, q_in, w, bias, blocks[0], blocks[0])
            k, v = torch.split(_linear_use(sink, name, k_in, w, bias, (e, 3 * e), (e, 3 * e)), e, -1)
        else:
            q, k, v = (_linear_use(sink, name, x, w, bias, r, r)
                       for x, r in zip((q_in, k_in, v_in), blocks))
    else:
        ws = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        q, k, v = (_linear_use(sink, name, x, wi, bias, None, r)
                   for x, wi, r in zip((q_in, k_in, v_in), ws, blocks))

    src = k.shape[1]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt, src):
                raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {(tgt, src)}.")
            attn_mask = attn_mask.view(1, 1, tgt, src)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (b * h, tgt, src):
                raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, "
                                   f"but should be {(b * h, tgt, src)}.")
            attn_mask = attn_mask.view(b, h, tgt, src)
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if m.bias_k is not None and m.bias_v is not None:
        k = _kv_bias_use(sink, name, k, m.bias_k)
        v = _kv_bias_use(sink, name, v, m.bias_v)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    q = q.reshape(b, tgt, h, hd).transpose(1, 2)
    k = k.reshape(b, k.shape[1], h, hd).transpose(1, 2)
    v = v.reshape(b, v.shape[1], h, hd).transpose(1, 2)
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(b, h, 1, hd)], 2)
        v = torch.cat([v, v.new_zeros(b, h, 1, hd)], 2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    if kpm is not None:
        kpm = kpm.view(b, 1, 1, k.shape[2])
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    dropout_p = m.dropout if m.training else 0.0

    weights = None
    if need_weights or sink.create_graph:
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
            attn_mask = q.new_zeros(attn_mask.shape).masked_fill(attn_mask, float("-inf"))
        scores = (q * math.sqrt(1.0 / hd)) @ k.mT
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        o = weights @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    o = o.transpose(1, 2).reshape(b, tgt, e)
    out = _linear_use(sink, name + ".out_proj", o, m.out_proj.weight, m.out_proj.bias, None, None)
    if not m.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    assert weights is not None
    return out, (weights.mean(dim=1) if a["average_attn_weights"] else weights)


def _no_pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    raise AssertionError("MultiheadAttention records its projections from its forward")


register_rule(nn.MultiheadAttention, Rule(_no_pieces, forward=_forward))
