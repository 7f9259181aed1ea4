"""Checks of ``ThermoMonitor``'s arguments: the recording intervals, ``ema``, ``symmetries``, the
writer, and the fixed data set (at least 2 samples; required by ``sharpness_every``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from neurothermo._data import Data, as_data
from neurothermo._validate import check_int, check_loss_fn
from neurothermo.monitor.writers import Writer


def check_settings(
    model: nn.Module, loss_fn: Callable[..., Tensor] | None, *, every: int,
    noise_every: int | None, sharpness_every: int | None, sync_every: int, max_charge_numel: int,
    ema: float, symmetries: str | Sequence[Any] | None, writer: Writer | None,
) -> tuple[int, int | None, int | None, int, int]:
    """Raise for a bad argument; else ``every``, ``noise_every``, ``sharpness_every``,
    ``sync_every`` and ``max_charge_numel``, checked."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_loss_fn(loss_fn)
    every = check_int("every", every)
    noise_every = None if noise_every is None else check_int("noise_every", noise_every)
    sharpness_every = (None if sharpness_every is None
                       else check_int("sharpness_every", sharpness_every))
    sync_every = check_int("sync_every", sync_every)
    max_charge_numel = check_int("max_charge_numel", max_charge_numel, minimum=1)
    if not (isinstance(ema, float | int) and 0 <= ema < 1):
        raise ValueError(f"ema must be a number in [0, 1), got {ema!r}")
    if not (symmetries is None or symmetries == "auto"
            or (isinstance(symmetries, Sequence) and not isinstance(symmetries, str))):
        raise ValueError(f"symmetries must be 'auto', None or a list of Symmetry, got {symmetries!r}")
    if writer is not None and not isinstance(writer, Writer):
        raise TypeError("writer needs write(rows, meta) and flush() (e.g. JSONLWriter(path))")
    return every, noise_every, sharpness_every, sync_every, max_charge_numel


def fixed_data(data: Any, loss_fn: Callable[..., Tensor] | None, model: nn.Module,
               sharpness_every: int | None) -> Data | None:
    """``data`` as the monitor's fixed set on ``model``'s device (None without it), checked."""
    out = None if data is None else as_data(data, loss_fn, name="data", model=model)
    if out is not None and out.count() < 2:
        raise ValueError("data has 1 sample; the monitor's fixed set needs at least 2")
    if sharpness_every is not None and out is None:
        raise ValueError(
            "sharpness_every needs data=(inputs, targets): sharpness is the top Hessian "
            "eigenvalue on a fixed set (never on single minibatches, docs/theory.md §4)"
        )
    return out
