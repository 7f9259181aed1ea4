"""Symmetry charges at a recorded step: the charge before the step, its predicted change (plain
SGD, ``quantities.predicted_change``) and the measured change after it, for the charges that are
not derived from the shared sums (``derive.deferred_charge``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from neurothermo.monitor.derive import deferred_charge
from neurothermo.monitor.distributed import full_tensors
from neurothermo.monitor.quantities import predicted_change
from neurothermo.monitor.symmetries import Tracked


def unit_keys(tracked: Sequence[Tracked]) -> list[tuple[str, int, tuple[int, ...] | None]]:
    """``(tensor, axis, view)`` of every per-unit read the tracked symmetries need, each once."""
    keys = {(s.name, s.dim, s.view): None for t in tracked if t.per_unit or deferred_charge(t)
            for s in t.sym.slices
            if s.role != "passive" and not s.buffer and s.dim is not None}
    return list(keys)


def charge_of(t: Tracked, params: Mapping[str, Tensor], sharded: bool) -> Tensor:
    """A charge that is not derived from the shared sums (``derive.deferred_charge``)."""
    cached = t.cached_charge(params)
    if cached is None:
        cached = t.sym.charge(full_tensors(params) if sharded else params)
        t.remember(cached, params)
    return cached


def record_charges(tracked: Sequence[Tracked], charge: Callable[[Tracked], Tensor],
                   grads: Mapping[str, Tensor | None], lr: float | None, wd: float, *,
                   predict: bool, max_charge_numel: int, values: dict[str, Any]) -> None:
    """Before the step: each charge and, when ``predict``, its predicted change, into ``values``."""
    for t in tracked:
        if deferred_charge(t):
            continue
        t.before = charge(t)
        t.predicted = None
        if predict:
            imbalance = t.sym.imbalance(grads)
            t.predicted = predicted_change(t.before, imbalance, lr, wd)  # type: ignore[arg-type]
        c = t.cols
        if t.before.numel() <= max_charge_numel:
            values[c["charge"]] = t.before
            if t.predicted is not None:
                values[c["pred"]] = t.predicted


def measure_charges(tracked: Sequence[Tracked], charge: Callable[[Tracked], Tensor], *,
                    max_charge_numel: int, values: dict[str, Any]) -> None:
    """After the step: each measured change and its largest error against the prediction."""
    for t in tracked:
        if deferred_charge(t):
            continue
        assert t.before is not None  # set by after_backward on recorded steps
        measured = charge(t) - t.before
        if t.before.numel() <= max_charge_numel:
            values[t.cols["meas"]] = measured
        if t.predicted is not None:
            values[t.cols["err"]] = (measured - t.predicted).abs().max()
