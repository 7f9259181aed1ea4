"""A PyTorch Lightning callback that drives a :class:`~neurothermo.ThermoMonitor` (optional).

Needs ``lightning`` (or the older ``pytorch_lightning``) installed; importing this module without
either raises an ImportError that says so. Usage::

    monitor = nt.ThermoMonitor(model.net, loss_fn)           # the module whose p.grad to read
    trainer = lightning.Trainer(callbacks=[ThermoMonitorCallback(monitor)], ...)

Hooks: the batch is remembered in ``on_train_batch_start`` and the loss in ``on_before_backward``
(so the entropic loss and total columns are recorded too); ``monitor.after_backward`` runs in
``on_before_optimizer_step`` (gradients final: after accumulation and clipping, before the step),
``monitor.after_step`` in ``on_train_batch_end``. The optimizer (``trainer.optimizers[0]``) is bound
at ``on_train_start``, so lr and weight decay come from its param groups. Steps are
``trainer.global_step`` values. The loss is taken from the ``training_step`` output when it is a
tensor or a dict with ``"loss"`` (recorded one hook later, at the step's end). Under
``strategy="ddp"`` the monitor reduces across the ranks as for a DDP model
(:mod:`neurothermo.monitor.distributed`: global batch size, mean loss, gathered per-sample norms)
and only rank 0 writes.
"""
from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef, unused-ignore]
    except ImportError as e:
        raise ImportError(
            "neurothermo.monitor.lightning needs PyTorch Lightning (pip install lightning); "
            "without it call monitor.after_backward / after_step in your own loop"
        ) from e

import torch

from neurothermo.monitor.monitor import ThermoMonitor


class ThermoMonitorCallback(pl.Callback):
    """Calls ``monitor.after_backward`` / ``after_step`` at the right Lightning hooks."""

    def __init__(self, monitor: ThermoMonitor) -> None:
        super().__init__()
        if not isinstance(monitor, ThermoMonitor):
            raise TypeError(f"monitor must be a ThermoMonitor, got {type(monitor).__name__}")
        self.monitor = monitor
        self._batch: Any = None
        self._step: int | None = None
        self._losses: list[torch.Tensor] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.optimizers:
            self.monitor.bind(trainer.optimizers[0])
        from neurothermo.monitor.distributed import attach

        attach(self.monitor)  # strategy="ddp": reduce over the ranks (docs/monitor.md)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if isinstance(loss, torch.Tensor) and loss.ndim == 0:
            self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        batch = self._batch
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise TypeError("ThermoMonitorCallback needs batches that are (inputs, targets) pairs")
        self._step = int(trainer.global_step)
        # the losses Lightning backpropagated since the last step (divided by
        # accumulate_grad_batches): their sum is the step's mean loss
        loss = torch.stack(self._losses).sum() if self._losses else None
        self._losses = []
        self.monitor.after_backward(self._step, (batch[0], batch[1]), loss=loss)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._step is None:
            return  # no optimizer step happened (gradient accumulation)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        ok = isinstance(loss, torch.Tensor) and loss.ndim == 0
        self.monitor.after_step(self._step, loss=loss if ok else None)  # used if none was given
        self._step = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.monitor.flush()
