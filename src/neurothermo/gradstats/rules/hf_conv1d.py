"""Hugging Face ``Conv1D`` (GPT-2's projections): a Linear with the weight stored transposed.

``y = x W + c`` with ``W`` of shape ``[in, out]``, so ``c_i(W) = Σ_t a_it δ_itᵀ`` (rows: input
features) and ``c_i(c) = Σ_t δ_it``: the Linear pieces with the roles of input and output gradient
swapped (the squared norm is the same Gram form). Registered by name: ``transformers`` is not
imported here.
"""
from __future__ import annotations

from torch import Tensor

from neurothermo.gradstats._pieces import Dense, Factored, Piece
from neurothermo.gradstats.rules._base import (
    Call,
    Rule,
    batch_first,
    batch_rows,
    register_named_rule,
)


def _pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    delta = deltas[0]
    if delta is None:
        return []
    b = call.batch_size
    a = call.input(0)
    m = batch_rows(call.name, a, b)  # 1, or m rows per sample for a sample-major fold
    batch_first(call.name, delta, b * m, "output gradient")
    weight, bias = call.param("weight"), call.param("bias")
    d = delta.reshape(b, 1, -1, delta.shape[-1])
    pieces = []
    if weight is not None:
        pieces.append(Piece(weight, Factored(a.reshape(b, 1, -1, a.shape[-1]), d)))
    if bias is not None:
        pieces.append(Piece(bias, Dense(d.sum((1, 2)))))
    return pieces


register_named_rule("transformers.pytorch_utils.Conv1D", Rule(_pieces))
