"""``nn.Embedding``: ``c_i(E) = Σ_t e_{x_it} δ_itᵀ`` (rows of tokens repeated in a sample add up).

``padding_idx`` rows get no gradient, as in torch. ``scale_grad_by_freq`` divides by how often a
token occurs in the *whole batch*, so samples interact: per-sample gradients are ill-defined and
an error says so.
"""
from __future__ import annotations

from torch import Tensor, nn

from neurothermo.gradstats._pieces import Indexed, Piece
from neurothermo.gradstats.rules._base import (
    Call,
    PerSampleUnsupportedError,
    Rule,
    batch_rows,
    register_rule,
)


def _pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    m = call.module
    assert isinstance(m, nn.Embedding)
    delta, weight = deltas[0], call.param("weight")
    if delta is None or weight is None:
        return []
    if m.scale_grad_by_freq:
        raise PerSampleUnsupportedError(
            f"module {call.name!r}: Embedding(scale_grad_by_freq=True) scales gradients by token "
            "counts over the whole batch, so per-sample gradients are ill-defined; construct the "
            "embedding with scale_grad_by_freq=False to measure them"
        )
    b = call.batch_size
    idx = call.input(0)
    batch_rows(call.name, idx, b)  # 1, or m rows per sample for a sample-major fold
    idx = idx.reshape(b, -1)
    d = delta.reshape(b, -1, delta.shape[-1])
    if m.padding_idx is not None:
        d = d * (idx != m.padding_idx).unsqueeze(-1).to(d.dtype)
    return [Piece(weight, Indexed(idx, d, m.num_embeddings))]


register_rule(nn.Embedding, Rule(_pieces))
