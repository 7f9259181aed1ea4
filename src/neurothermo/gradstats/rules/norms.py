"""Affine parameters of normalisation layers: ``y = x̂ ⊙ w + c`` with ``x̂`` free of ``w, c``.

``c_i(w) = Σ_positions δ_i ⊙ x̂_i`` and ``c_i(c) = Σ_positions δ_i``, with ``x̂`` recomputed from the
recorded input (differentiably, for ``create_graph``). Covered: LayerNorm, RMSNorm (the normalised
trailing dims), GroupNorm, InstanceNorm and BatchNorm in eval mode with running statistics (per
channel, dim 1). BatchNorm that normalises with *batch* statistics (train mode, or
``track_running_stats=False``) couples the samples: :func:`check_batchnorm` rejects it up front.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from neurothermo.gradstats._pieces import Dense, Piece
from neurothermo.gradstats.rules._base import Call, Rule, batch_first, register_rule


def check_batchnorm(model: nn.Module) -> None:
    """Raise if a BatchNorm of ``model`` would normalise with the statistics of the batch."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or m.running_mean is None
        ):
            why = "is in train mode" if m.training else "has track_running_stats=False"
            raise ValueError(
                f"BatchNorm module {name or type(m).__name__!r} {why}: it normalises each sample "
                "with statistics of the whole batch, so a sample's output (and loss) depends on "
                "the other samples and per-sample gradients are ill-defined. Call model.eval() "
                "(BatchNorm then uses its running statistics) or replace BatchNorm with "
                "GroupNorm / LayerNorm."
            )


def _affine_pieces(call: Call, delta: Tensor, xhat: Tensor, channel_dim: int | None
                   ) -> list[Piece]:
    """``channel_dim``: the affine broadcasts over dim 1 (channels); None: over trailing dims."""
    b = call.batch_size
    weight, bias = call.param("weight"), call.param("bias")
    pieces = []
    for p, g in ((weight, delta * xhat if weight is not None else None), (bias, delta)):
        if p is None or g is None:
            continue
        if channel_dim is None:
            g = g.reshape(b, -1, *p.shape).sum(1)
        else:
            g = g.reshape(b, g.shape[1], -1).sum(-1)
        pieces.append(Piece(p, Dense(g)))
    return pieces


def _layer_norm(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    m = call.module
    assert isinstance(m, nn.LayerNorm)
    if deltas[0] is None:
        return []
    x = batch_first(call.name, call.input(0), call.batch_size)
    xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return _affine_pieces(call, deltas[0], xhat, None)


def _rms_norm(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    m = call.module
    assert isinstance(m, nn.RMSNorm)
    if deltas[0] is None:
        return []
    x = batch_first(call.name, call.input(0), call.batch_size)
    xhat = F.rms_norm(x, m.normalized_shape, None, m.eps)
    return _affine_pieces(call, deltas[0], xhat, None)


def _group_norm(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    m = call.module
    assert isinstance(m, nn.GroupNorm)
    if deltas[0] is None:
        return []
    x = batch_first(call.name, call.input(0), call.batch_size)
    xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
    return _affine_pieces(call, deltas[0], xhat, 1)


def _batch_norm(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    m = call.module
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    if deltas[0] is None:
        return []
    if m.training or m.running_mean is None:  # check_batchnorm ran first; never a wrong number
        raise ValueError(f"BatchNorm module {call.name!r} normalises with batch statistics")
    x = batch_first(call.name, call.input(0), call.batch_size)
    xhat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    return _affine_pieces(call, deltas[0], xhat, 1)


def _instance_norm(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
    m = call.module
    assert isinstance(m, nn.modules.instancenorm._InstanceNorm)
    if deltas[0] is None:
        return []
    x = batch_first(call.name, call.input(0), call.batch_size)
    if x.dim() != m._get_no_batch_dim() + 1:
        raise ValueError(f"module {call.name!r}: unbatched InstanceNorm input has no batch axis")
    use_input_stats = m.training or not m.track_running_stats
    # Never pass the running buffers when normalising with input statistics: they would update.
    rm, rv = (None, None) if use_input_stats else (m.running_mean, m.running_var)
    xhat = F.instance_norm(x, rm, rv, None, None, use_input_stats, 0.0, m.eps)
    return _affine_pieces(call, deltas[0], xhat, 1)


register_rule(nn.LayerNorm, Rule(_layer_norm))
register_rule(nn.RMSNorm, Rule(_rms_norm))
register_rule(nn.GroupNorm, Rule(_group_norm))
register_rule(nn.modules.batchnorm._BatchNorm, Rule(_batch_norm))
register_rule(nn.modules.instancenorm._InstanceNorm, Rule(_instance_norm))
