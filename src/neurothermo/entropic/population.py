"""Exact passes over a population of samples, chunk by chunk: the checks shared by the expected
entropic terms, the per-chunk loss, mean gradient and summed squared per-sample gradient norms, and
the population's mean loss, mean gradient and mean squared per-sample gradient norm."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Batch, Data
from neurothermo._state import as_float32, has_train_mode_batchnorm
from neurothermo._types import LossFn
from neurothermo._validate import check_int, check_loss_fn
from neurothermo.entropic._common import check_common, check_data, grads, model_parameters
from neurothermo.gradstats.norms import stats_of_batch


def _prepare(model: nn.Module, loss_fn: LossFn, data: Any, lr: float, batch_size: int,
             replacement: bool, weight_decay: float, chunk_size: int, num_data: int | None
             ) -> tuple[float, float, Data, int, int, dict[str, Tensor]]:
    lr, wd = check_common(lr, weight_decay)
    check_int("chunk_size", chunk_size, minimum=1)
    params = model_parameters(model)
    d, n, b = check_data(data, batch_size, replacement, loss_fn, model=model, num_data=num_data)
    bn = has_train_mode_batchnorm(model)
    if bn is not None:
        raise ValueError(
            f"BatchNorm layer {bn!r} is in train mode: it couples the samples of a batch, so "
            "per-sample losses and the covariance Σ are undefined; pass mode='eval' or call "
            "model.eval() first"
        )
    check_loss_fn(loss_fn)
    return lr, wd, d, n, b, params


def _chunk_stats(model: nn.Module, loss_fn: LossFn, batch: Batch,
                 params: dict[str, Tensor], *, create_graph: bool
                 ) -> tuple[Tensor, list[Tensor], Tensor]:
    """One forward + one backward of the chunk's mean loss ``l_c``: ``l_c``, ``∇l_c`` (a list in
    the order of ``params``) and ``Σ_i ‖g_i‖²`` over the chunk. With ``create_graph`` all three
    are differentiable (the sum in the parameters' dtype), else the sum is taken in float64.
    Validated input; the caller preserves the model's state."""
    stats = stats_of_batch(model, loss_fn, batch.map(as_float32), params,
                           create_graph=create_graph, mean_grad=True)
    assert stats.mean_grad is not None
    dtype = None if create_graph else torch.float64
    sq_sum = torch.stack([s.sum(dtype=dtype) for s in stats.sq_norms.values()]).sum()
    return stats.loss, [stats.mean_grad[nm] for nm in params], sq_sum


def _mean_gradient(model: nn.Module, loss_fn: LossFn, data: Data, n: int,
                   params: dict[str, Tensor], chunk_size: int,
                   *, norms: bool) -> tuple[Tensor, list[Tensor], Tensor]:
    """``L``, ``ḡ = ∇L`` and ``(1/N) Σ_i ‖g_i‖²`` (if ``norms``; accumulated in float64) exactly,
    chunk by chunk, each chunk weighted by its size ``b_c / N``."""
    leaves = list(params.values())
    loss = torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device)
    gbar: list[Tensor] | None = None
    sq = torch.zeros((), dtype=torch.float64, device=loss.device)
    for chunk in data.chunks(chunk_size):
        w = chunk.size / n
        if norms:  # norms and gradient from one forward + backward
            value, g, chunk_sq = _chunk_stats(model, loss_fn, chunk, params, create_graph=False)
            sq = sq + chunk_sq / n
        else:
            value = chunk.map(as_float32).loss(model, loss_fn)
            g = grads(value, leaves)
        if chunk.size == n:  # one chunk: ḡ is its gradient
            gbar = g
        else:
            if gbar is None:
                gbar = [torch.zeros_like(p) for p in leaves]
            for acc, gi in zip(gbar, g):
                acc.add_(gi, alpha=w)
        loss = loss + w * value.detach()
    assert gbar is not None
    return loss, gbar, sq
