"""Affine parameters of normalisation layers: ``y = x̂ ⊙ w + c`` with ``x̂`` free of ``w, c``.

``c_i(w) = Σ_positions δ_i ⊙ x̂_i`` and ``c_i(c) = Σ_positions δ_i``, with ``x̂`` recomputed from the
recorded input (differentiably, for ``create_graph``). Covered: LayerNorm, RMSNorm (the normalised
trailing dims), GroupNorm, InstanceNorm and BatchNorm in eval mode with running statistics (per
channel, dim 1). BatchNorm that normalises with *batch* statistics (train mode, or
``track_running_stats=False``) couples the samples: :func:`check_batchnorm` rejects it up front.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from neurothermo.gradstats._pieces import Dense, Piece
from neurothermo.gradstats.rules._base import (
    Call,
    PerSampleUnsupportedError,
    Rule,
    batch_first,
    batch_rows,
    register_rule,
)

M = TypeVar("M", bound=nn.Module)


def check_batchnorm(model: nn.Module) -> None:
    """Raise if a BatchNorm of ``model`` would normalise with the statistics of the batch.

    Such a layer makes a sample's output depend on the other samples of its batch, so
    per-sample gradients are ill-defined.

    Args:
        model: the network to check.

    Raises:
        PerSampleUnsupportedError: (a ``ValueError``) a BatchNorm in train mode or with
            ``track_running_stats=False``, named (use ``model.eval()``, or GroupNorm / LayerNorm).

    Example:
        >>> from torch import nn
        >>> from neurothermo.gradstats.rules import check_batchnorm
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> check_batchnorm(model.eval())  # running statistics: fine
        >>> try:
        ...     check_batchnorm(model.train())
        ... except ValueError as e:  # a PerSampleUnsupportedError
        ...     print(str(e)[:41])
        BatchNorm module '1' is in train mode: it
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or m.running_mean is None
        ):
            why = "is in train mode" if m.training else "has track_running_stats=False"
            raise PerSampleUnsupportedError(
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


def _affine_rule(kind: type[M], channel_dim: int | None,
                 normalise: Callable[[Call, M], Tensor]) -> Rule:
    """The rule of a normalisation layer of type ``kind``: ``normalise(call, module)`` gives ``x̂``
    (computed from the recorded input), the affine pieces follow from it (see _affine_pieces)."""
    def rule(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
        m = call.module
        assert isinstance(m, kind)
        if deltas[0] is None:
            return []
        return _affine_pieces(call, deltas[0], normalise(call, m), channel_dim)

    return Rule(rule)


def _input(call: Call) -> Tensor:
    return batch_first(call.name, call.input(0), call.batch_size)


def _trailing_input(call: Call) -> Tensor:
    """The input of a norm over trailing dims, whose pieces reshape to ``(b, -1, …)``: a
    sample-major fold of the batch (``[b·m, …]``) is exact there."""
    x = call.input(0)
    batch_rows(call.name, x, call.batch_size)
    return x


def _layer_norm(call: Call, m: nn.LayerNorm) -> Tensor:
    return F.layer_norm(_trailing_input(call), m.normalized_shape, None, None, m.eps)


def _rms_norm(call: Call, m: nn.RMSNorm) -> Tensor:
    return F.rms_norm(_trailing_input(call), m.normalized_shape, None, m.eps)


def _group_norm(call: Call, m: nn.GroupNorm) -> Tensor:
    return F.group_norm(_input(call), m.num_groups, None, None, m.eps)


def _batch_norm(call: Call, m: nn.modules.batchnorm._BatchNorm) -> Tensor:
    if m.training or m.running_mean is None:  # check_batchnorm ran first; never a wrong number
        raise PerSampleUnsupportedError(f"BatchNorm module {call.name!r} normalises with batch statistics")
    return F.batch_norm(_input(call), m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


def _instance_norm(call: Call, m: nn.modules.instancenorm._InstanceNorm) -> Tensor:
    x = _input(call)
    # torch's private _get_no_batch_dim carries no annotations
    if x.dim() != m._get_no_batch_dim() + 1:  # type: ignore[no-untyped-call]
        raise PerSampleUnsupportedError(f"module {call.name!r}: unbatched InstanceNorm input has no batch axis")
    use_input_stats = m.training or not m.track_running_stats
    # Never pass the running buffers when normalising with input statistics: they would update.
    rm, rv = (None, None) if use_input_stats else (m.running_mean, m.running_var)
    return F.instance_norm(x, rm, rv, None, None, use_input_stats, 0.0, m.eps)


register_rule(nn.LayerNorm, _affine_rule(nn.LayerNorm, None, _layer_norm))
register_rule(nn.RMSNorm, _affine_rule(nn.RMSNorm, None, _rms_norm))
register_rule(nn.GroupNorm, _affine_rule(nn.GroupNorm, 1, _group_norm))
register_rule(nn.modules.batchnorm._BatchNorm,
              _affine_rule(nn.modules.batchnorm._BatchNorm, 1, _batch_norm))
register_rule(nn.modules.instancenorm._InstanceNorm,
              _affine_rule(nn.modules.instancenorm._InstanceNorm, 1, _instance_norm))
