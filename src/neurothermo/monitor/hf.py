"""A Hugging Face ``TrainerCallback`` that drives a :class:`~neurothermo.ThermoMonitor` (optional).

Needs ``transformers`` (and ``accelerate``, which its ``Trainer`` needs). Usage::

    from neurothermo.monitor.hf import ThermoTrainerCallback

    callback = ThermoTrainerCallback(noise_every=10)          # ThermoMonitor's keyword arguments
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    callback.install_first(trainer)   # optional: report_to integrations then see the columns too
    trainer.train()
    callback.monitor.history          # every column, every recorded step

How it reads the Trainer: the monitor is built in ``on_train_begin`` on the Trainer's model with
``loss_fn=model_loss`` (the model returns its mean loss from ``labels``) and the Trainer's
optimizer (lr and weight decay from its param groups). A forward pre-hook on the model remembers
the inputs of every training forward since the last optimizer step (the Trainer's batches: a dict
with ``labels``), and a forward hook the loss the model returned. ``monitor.after_backward`` runs in
``on_pre_optimizer_step`` (gradients final: accumulated and clipped), ``monitor.after_step`` in
``on_optimizer_step``; steps are ``state.global_step`` before its increment. With gradient
accumulation the micro-batches are concatenated (their tensors must have equal trailing shapes:
pad to a fixed length); the step's loss is the sum of the micro-batch losses when the Trainer
passes ``num_items_in_batch`` (the model then returns ``Σ loss_i / count``), else their mean
(equal micro-batches): in both cases the mean loss over the step's samples, whose gradient the
accumulated one is.

``on_log`` adds the latest value of every scalar column as ``thermo/<column>`` to the logs the
Trainer hands to its callbacks and to the last entry of ``state.log_history``; per-unit vector
columns stay in ``callback.monitor.history`` (or a writer). Integrations that report logs
(``report_to``) run before user callbacks: :meth:`ThermoTrainerCallback.install_first` puts this
callback first so that they report the columns too.

Under DDP (``torchrun`` with the Trainer) the reductions of ``neurothermo.monitor.distributed``
are attached to the monitor (the Trainer hands callbacks the unwrapped model); with
``average_tokens_across_devices`` the count is global, so a rank's summed loss is scaled by the
number of ranks before the mean over ranks, as the Trainer scales it before backward.
"""
from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("neurothermo.monitor.hf needs transformers (pip install transformers "
                      "accelerate); without it call monitor.after_backward / after_step yourself") from e

import torch
from torch import Tensor, nn

from neurothermo._data import model_loss
from neurothermo.monitor.monitor import ThermoMonitor

PREFIX = "thermo/"


class ThermoTrainerCallback(TrainerCallback):
    """Runs a :class:`ThermoMonitor` inside ``transformers.Trainer`` (see the module docstring).

    Args:
        monitor: a monitor built on the Trainer's model (``loss_fn=model_loss``), or None to
            build one in ``on_train_begin`` from ``monitor_kwargs``.
        **monitor_kwargs: keyword arguments of :class:`ThermoMonitor` (``every``, ``noise_every``,
            ``writer``, ...); ``optimizer`` is the Trainer's.

    Raises:
        TypeError: ``monitor`` is not a ThermoMonitor.
        ValueError: both ``monitor`` and keyword arguments; micro-batches that cannot be
            concatenated (at the step that has them).
    """

    def __init__(self, monitor: ThermoMonitor | None = None, **monitor_kwargs: Any) -> None:
        if monitor is not None and not isinstance(monitor, ThermoMonitor):
            raise TypeError(f"monitor must be a ThermoMonitor, got {type(monitor).__name__}")
        if monitor is not None and monitor_kwargs:
            raise ValueError("give either a monitor or ThermoMonitor keyword arguments, not both")
        self.monitor: ThermoMonitor | None = monitor
        self._kwargs = monitor_kwargs
        self._inputs: list[dict[str, Any]] = []
        self._losses: list[Tensor] = []
        self._handles: list[Any] = []
        self._busy = False  # the monitor's own passes call the model too: not training batches
        self._step: int | None = None
        self._summed = False

    def install_first(self, trainer: Any) -> ThermoTrainerCallback:
        """Put this callback first in ``trainer``'s list (added if missing), before ``report_to``."""
        cbs = trainer.callback_handler.callbacks
        if self in cbs:
            cbs.remove(self)
        cbs.insert(0, self)
        return self

    # ---- hooks on the model ----------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._busy or not module.training or not torch.is_grad_enabled():
            return
        if args:
            raise TypeError("ThermoTrainerCallback reads keyword inputs (the Trainer calls "
                            "model(**inputs)); got positional arguments")
        # num_items_in_batch: the Trainer's count of the step's samples (a scalar, not an input
        # per sample); with it the model returns sum(loss_i) / count, so micro losses add up
        self._summed = "num_items_in_batch" in kwargs
        self._inputs.append({k: v for k, v in kwargs.items()
                             if isinstance(v, Tensor) and v.ndim > 0 and k != "num_items_in_batch"})

    def _post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._busy or not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.ndim == 0:
            self._losses.append(loss.detach())

    # ---- Trainer events --------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("ThermoTrainerCallback: the Trainer passed no model to on_train_begin")
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        if self.monitor is None:
            self.monitor = ThermoMonitor(model, model_loss, optimizer=opt, **self._kwargs)
        elif opt is not None:
            self.monitor.bind(opt)
        from neurothermo.monitor.distributed import attach

        attach(self.monitor)
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.monitor is not None  # built in on_train_begin
        inputs, losses = self._inputs, self._losses
        self._inputs, self._losses = [], []
        if not inputs:
            return  # no training forward was seen (nothing to record)
        batch = inputs[0] if len(inputs) == 1 else _concat(inputs)
        loss = None
        if len(losses) == len(inputs):  # the step's mean loss over all its samples
            loss = torch.stack(losses).sum() if self._summed else torch.stack(losses).mean()
            world = int(getattr(args, "world_size", 1) or 1)
            if self._summed and world > 1 and getattr(args, "average_tokens_across_devices", False):
                # count gathered over the ranks: this rank's sum / global count; the monitor's
                # mean over ranks times world is then the global mean (the Trainer scales the same)
                loss = loss * world
        self._step = int(state.global_step)
        self._busy = True
        try:
            self.monitor.after_backward(self._step, batch, loss=loss)
        finally:
            self._busy = False

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step is None or self.monitor is None:
            return
        self._busy = True
        try:
            self.monitor.after_step(self._step)
        finally:
            self._busy, self._step = False, None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.monitor is None or logs is None or "train_runtime" in logs:
            return  # nothing recorded yet, or the end-of-training summary
        cols = latest_scalars(self.monitor)
        logs.update(cols)
        if state.log_history:
            state.log_history[-1].update(cols)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.monitor is not None:
            self.monitor.flush()


def latest_scalars(monitor: ThermoMonitor) -> dict[str, float]:
    """``{"thermo/<column>": latest value}`` for every scalar column of ``monitor.history``."""
    h = monitor.history
    out = {}
    for name in h.columns:
        v = h[name]
        if len(v) and v.ndim == 1:  # one scalar per step
            out[PREFIX + name] = float(v[-1])
    return out


def _concat(inputs: list[dict[str, Any]]) -> dict[str, Tensor]:
    keys = inputs[0].keys()
    if any(d.keys() != keys for d in inputs):
        raise ValueError("ThermoTrainerCallback: the micro-batches of one optimizer step have "
                         "different inputs; give them the same keys")
    try:
        return {k: torch.cat([d[k] for d in inputs]) for k in keys}
    except RuntimeError as e:
        raise ValueError(
            "ThermoTrainerCallback: cannot concatenate the micro-batches of one optimizer step "
            f"(gradient accumulation) into the step's batch ({e}); pad every batch to the same "
            "length (tokenizer padding='max_length' or a collator with a fixed length)") from e
