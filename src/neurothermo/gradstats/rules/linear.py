"""``nn.Linear``, any leading dimensions: ``c_i(W) = Σ_t δ_it a_itᵀ``, ``c_i(bias) = Σ_t δ_it``.

Without positions (``[b, in]`` input) the squared norm is ``‖a_i‖²‖δ_i‖²``; with positions the
Gram form ``Σ_{t,s}(a_t·a_s)(δ_t·δ_s)`` or the dense sum, whichever is cheaper (``_pieces``).
"""
from __future__ import annotations

from torch import Tensor, nn

from neurothermo.gradstats._pieces import Dense, Factored, Piece
from neurothermo.gradstats.rules._base import Call, Rule, batch_first, batch_rows, register_rule


def linear_pieces(name: str, a: Tensor, delta: Tensor, weight: Tensor | None,
                  bias: Tensor | None, b: int, *, weight_rows: tuple[int, int] | None = None,
                  bias_rows: tuple[int, int] | None = None) -> list[Piece]:
    """Pieces of ``y = a Wᵀ + c`` from its input ``a`` and output gradient ``delta``."""
    m = batch_rows(name, a, b)  # rows per sample: 1, or m for a sample-major fold [b·m, …]
    batch_first(name, delta, b * m, "output gradient")
    d = delta.reshape(b, 1, -1, delta.shape[-1])
    pieces = []
    if weight is not None:
        pieces.append(Piece(weight, Factored(d, a.reshape(b, 1, -1, a.shape[-1])), weight_rows))
    if bias is not None:
        pieces.append(Piece(bias, Dense(d.sum((1, 2))), bias_rows))
    return pieces


def _pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    delta = deltas[0]
    if delta is None:
        return []
    return linear_pieces(call.name, call.input(0), delta, call.param("weight"),
                         call.param("bias"), call.batch_size)


register_rule(nn.Linear, Rule(_pieces))
