"""The monitor's derived columns, computed per block of recorded steps when the history is flushed.

At a recorded step the monitor makes only the memory-bound reductions of the gradients and of the
parameters (:meth:`SquareSums.prepare`: squared entries summed per unit and per tensor) and keeps
the small vectors that result in a :class:`RawStep`. Everything else is derived here for many
steps at once, steps along the first axis, so the training loop pays a dozen kernels per step and
no Python bookkeeping per column:

* per layer ``‖g‖²`` (sum over the layer's tensors), its running expectation
  ``m_t = β·m_{t−1} + (1 − β)·x_t`` reported bias-corrected as ``m_t / (1 − β^t)``, the ratios
  ``m_a / m_b`` and residuals ``(m_a − m_b)/(m_a + m_b)`` of consecutive layers, weight norms;
* per unit of a per-unit symmetry the incoming and outgoing gradient energies, their running
  expectations, ``Σ_u m_in / Σ_u m_out`` and ``Σ_u |m_in − m_out| / Σ_u (m_in + m_out)``;
* for symmetries with one charge entry per unit (rescale, scale) the charge
  ``J_u = Σ_in θ² − Σ_out θ²`` before the step, its measured
  change (after minus before) and, for plain SGD, the exact prediction
  ``((1 − lr·wd)² − 1)·J + lr²·(e_in − e_out)`` and ``max_u |measured − predicted|``;
* ``lr``, ``b`` and the temperature ``lr/b``.

The running averages advance row by row in the same arithmetic as a step-by-step update, so the
numbers do not depend on how steps are grouped into blocks. Conventions as in ``quantities.py``:
``g`` is the mean-minibatch-loss gradient without weight decay, ``wd`` torch's weight decay.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neurothermo.monitor import names
from neurothermo.monitor.quantities import SquareSums, balance_residual, ema_update

if TYPE_CHECKING:
    from neurothermo.monitor.symmetries import Tracked

Columns = dict[str, tuple[list[int], Tensor]]


@dataclass(eq=False)
class RawStep:
    """What one recorded step keeps until the next flush (reduced vectors only, no big tensors).

    ``predict``: the step is a plain SGD step, so charge predictions are exact and recorded.
    ``after`` is set by ``after_step`` when charges derived from the sums are tracked.
    """

    step: int
    lr: float | None
    wd: float
    batch_size: int
    predict: bool
    grads: SquareSums
    before: SquareSums
    after: SquareSums | None = None


@dataclass(frozen=True)
class Layout:
    """What the derivation needs to know of the monitor, fixed when the monitor is built.

    ``names``: the parameters' names; ``param_layer``: each parameter's layer index; ``layer_cols``
    / ``pair_cols``: per layer ``(‖g‖², its EMA, weight norm)`` column names and per consecutive
    pair ``(ratio, residual)``; ``beta``: the EMA factor β; ``max_charge_numel``: charges with more
    units are summarised, not stored."""

    names: list[str]
    param_layer: list[int]
    layer_cols: list[tuple[str, str, str]]
    pair_cols: list[tuple[str, str]]
    beta: float
    max_charge_numel: int


@dataclass(frozen=True)
class LayerEma:
    """The per-layer running expectation carried from one flush to the next: the raw EMA ``m_t``
    (``None`` before the first step) and the number of steps ``t`` folded in (for the bias
    correction ``1 − β^t``)."""

    avg: Tensor | None = None
    count: int = 0


def _running(state: list[Any], rows: Tensor, beta: float) -> Tensor:
    """EMA rows ``m_t`` for ``rows`` [T, ...], continuing from ``state[0]`` (updated in place)."""
    out = []
    avg = state[0]
    for x in rows:
        avg = ema_update(avg, x, beta)
        out.append(avg)
    state[0] = avg
    return torch.stack(out)


def _running_many(states: list[Tensor | None], series: list[Tensor], beta: float) -> list[Tensor]:
    """:func:`_running` of several series ``[T, n_k]`` at once, ``states[k]`` updated in place.

    The EMA is elementwise, so the series are joined along their last axis and advanced together
    (one update per row for all of them, in the same arithmetic as one series at a time: the
    numbers are bit for bit those of separate updates). Series that cannot be joined (states
    of mixed presence, dtypes or devices) advance one at a time."""
    if not series:
        return []
    fresh = all(st is None for st in states)
    ref = series[0]
    joinable = (fresh or all(st is not None for st in states)) and all(
        x.dtype == ref.dtype and x.device == ref.device and x.dim() == 2 for x in series)
    if not joinable:
        out = []
        for k, x in enumerate(series):
            state: list[Any] = [states[k]]
            out.append(_running(state, x, beta))
            states[k] = state[0]
        return out
    widths = [x.shape[-1] for x in series]
    joined: list[Any] = [None if fresh else torch.cat(states, -1)]  # type: ignore[arg-type]
    run = _running(joined, torch.cat(series, -1), beta)
    states[:] = list(torch.split(joined[0], widths, -1))
    return list(torch.split(run, widths, -1))


def derive(layout: Layout, tracked: Sequence[Tracked], ema: LayerEma, block: Sequence[RawStep]
           ) -> tuple[Columns, LayerEma]:
    """Every deferred column of ``block`` as ``{column: (steps, values stacked per step)}``, and the
    layer EMA after the block. ``tracked``'s unit EMAs (``ema_in``/``ema_out``) advance in place."""
    steps = [r.step for r in block]
    cols: Columns = {}
    grads = SquareSums.stacked([r.grads for r in block])
    before = SquareSums.stacked([r.before for r in block])
    per_unit = [t for t in tracked if t.per_unit]
    energies = [grads.unit_energies(t.sym.slices, t.sym.n_units) for t in per_unit]
    layer_sq, w_norm = _layer_sums(layout, grads, before)
    # every running expectation (per layer, per unit in and out) advances in one loop over rows
    states: list[Tensor | None] = [ema.avg]
    series = [layer_sq]
    for t, (e_in, e_out) in zip(per_unit, energies):
        states += [t.ema_in, t.ema_out]
        series += [e_in, e_out]
    running = _running_many(states, series, layout.beta)
    ema = _layers(layout, ema, steps, layer_sq, w_norm, running[0], states[0], cols)
    for k, t in enumerate(per_unit):
        t.ema_in, t.ema_out = states[1 + 2 * k], states[2 + 2 * k]
        _units(t, steps, *energies[k], running[1 + 2 * k], running[2 + 2 * k], cols)
    with_lr = [i for i, r in enumerate(block) if r.lr is not None]
    if with_lr:
        at = [steps[i] for i in with_lr]
        lrs = [float(block[i].lr) for i in with_lr]  # type: ignore[arg-type]
        bs = [block[i].batch_size for i in with_lr]
        f64 = torch.float64
        cols[names.LR] = (at, torch.tensor(lrs, dtype=f64))
        cols[names.BATCH_SIZE] = (at, torch.tensor(bs, dtype=f64))
        cols[names.TEMPERATURE] = (at, torch.tensor([lr / b for lr, b in zip(lrs, bs)], dtype=f64))
    rescale = [t for t in tracked if deferred_charge(t)]
    after = (SquareSums.stacked([r.after for r in block])  # type: ignore[misc]
             if rescale else None)
    for t in rescale:
        assert after is not None
        _charges(layout.max_charge_numel, t, block, grads, before, after, cols)
    return cols, ema


def deferred_charge(t: Tracked) -> bool:
    """Whether ``t``'s charge is derived from the shared sums at flush time.

    A charge with one entry per unit (``block == 1``, not ``whole``: rescale, and the scale
    invariance of the weights in front of a normalisation) is ``J_u = Σ_in θ² − Σ_out θ²`` over
    the unit's rows, which the step's per-unit sums already hold; matrix and whole-model charges
    (double rotations, one scale for all slices) are computed eagerly with ``sym.charge``."""
    if t.deferred is None:  # fixed per symmetry: decided once
        s = t.sym
        t.deferred = (s.block == 1 and not s.whole and all(
            sl.dim is not None and not sl.buffer for sl in s.slices if sl.role != "passive"))
    return t.deferred


def _layer_sums(layout: Layout, grads: SquareSums, before: SquareSums) -> tuple[Tensor, Tensor]:
    """Per step and layer ``‖g‖²`` (sum over the layer's tensors) and the weight norm ``‖θ‖``."""
    n_layers = len(layout.layer_cols)
    group = torch.tensor(layout.param_layer)
    per_g = grads.per_tensor(layout.names)  # [T, P]
    per_p = before.per_tensor(layout.names)
    index = group.to(per_g.device)
    layer_sq = per_g.new_zeros(per_g.shape[0], n_layers).index_add_(1, index, per_g)
    w_norm = per_p.new_zeros(per_p.shape[0], n_layers).index_add_(1, index, per_p).sqrt()
    return layer_sq, w_norm


def _layers(layout: Layout, ema_in: LayerEma, steps: list[int], layer_sq: Tensor, w_norm: Tensor,
            ema: Tensor, avg: Tensor | None, cols: Columns) -> LayerEma:
    """The per-layer columns from the layer sums and their running expectation rows ``ema``
    (``avg``: the raw EMA after the block)."""
    first = ema_in.count
    corr = torch.tensor([1 - layout.beta ** (first + i + 1) for i in range(len(steps))],
                        dtype=torch.float64).to(ema.device, ema.dtype)
    ema_hat = ema / corr[:, None]
    ratio = ema[:, :-1] / ema[:, 1:]
    resid = (ema[:, :-1] - ema[:, 1:]) / (ema[:, :-1] + ema[:, 1:])
    for k, (c_sq, c_ema, c_w) in enumerate(layout.layer_cols):
        cols[c_sq], cols[c_ema], cols[c_w] = (steps, layer_sq[:, k]), (steps, ema_hat[:, k]), (steps, w_norm[:, k])
    for k, (c_ratio, c_resid) in enumerate(layout.pair_cols):
        cols[c_ratio], cols[c_resid] = (steps, ratio[:, k]), (steps, resid[:, k])
    return LayerEma(avg, first + len(steps))


def _units(t: Tracked, steps: list[int], e_in: Tensor, e_out: Tensor, m_in: Tensor, m_out: Tensor,
           cols: Columns) -> None:
    """The per-unit columns of ``t`` from the energies and their running expectations."""
    s_in, s_out = m_in.sum(-1), m_out.sum(-1)
    c = t.cols
    cols[c["in"]], cols[c["out"]] = (steps, e_in), (steps, e_out)
    cols[c["ratio"]] = (steps, s_in / s_out)
    cols[c["residual"]] = (steps, balance_residual(m_in, m_out, s_in, s_out))


def _charges(max_charge_numel: int, t: Tracked, block: Sequence[RawStep], grads: SquareSums,
             before: SquareSums, after: SquareSums, cols: Columns) -> None:
    steps = [r.step for r in block]
    j_in, j_out = before.unit_energies(t.sym.slices, t.sym.n_units)
    a_in, a_out = after.unit_energies(t.sym.slices, t.sym.n_units)
    charge = j_in - j_out
    measured = (a_in - a_out) - charge
    c = t.cols
    small = t.sym.n_units <= max_charge_numel
    if small:
        cols[c["charge"]], cols[c["meas"]] = (steps, charge), (steps, measured)
    rows = [i for i, r in enumerate(block) if r.predict and r.lr is not None]
    if not rows:
        return
    e_in, e_out = grads.unit_energies(t.sym.slices, t.sym.n_units)
    at = [steps[i] for i in rows]
    idx = torch.tensor(rows, device=charge.device)
    # the coefficients in Python floats, as a per-step update with scalar lr and wd would use them
    decay = torch.tensor([(1.0 - block[i].lr * block[i].wd) ** 2 - 1.0 for i in rows],  # type: ignore[operator]
                         dtype=torch.float64).to(charge.device, charge.dtype)[:, None]
    lr2 = torch.tensor([block[i].lr ** 2 for i in rows],  # type: ignore[operator]
                       dtype=torch.float64).to(charge.device, charge.dtype)[:, None]
    predicted = decay * charge[idx] + lr2 * (e_in - e_out)[idx]
    if small:
        cols[c["pred"]] = (at, predicted)
    cols[c["err"]] = (at, (measured[idx] - predicted).abs().amax(-1))
