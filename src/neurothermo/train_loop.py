"""The steps of ``nt.train``: the data order, the scheduled learning rate, the optimizer step,
the divergence checks and the periodic checkpoint writes."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Batch
from neurothermo.monitor.history import History
from neurothermo.train_checkpoint import _FORMAT, _rng_state, save_atomic

_CHECK_EVERY_ACCEL = 20


class TrainingDiverged(FloatingPointError):
    """Training produced a NaN/Inf loss or parameter; attributes say where and how to resume."""

    def __init__(self, message: str, *, step: int, lr: float, last_finite_loss: float | None,
                 checkpoint: Path | None, history: History) -> None:
        super().__init__(message)
        self.step, self.lr, self.last_finite_loss = step, lr, last_finite_loss
        self.checkpoint, self.history = checkpoint, history


class DataOrder:
    """Which samples each step sees: deterministic, and resumable from its ``state_dict``."""

    def __init__(self, n: int, batch_size: int, *, replacement: bool, full: bool, seed: int) -> None:
        self.n, self.b, self.replacement, self.full = n, batch_size, replacement, full
        self.gen = torch.Generator().manual_seed(seed)
        self.perm: Tensor | None = None
        self.pos, self.epoch = 0, 0

    def next(self) -> Tensor | None:
        """Indices of the next batch (CPU int64), or None for the full dataset."""
        if self.full:
            return None
        if self.replacement:
            return torch.randint(self.n, (self.b,), generator=self.gen)
        if self.perm is None or self.pos + self.b > self.n:
            if self.perm is not None:
                self.epoch += 1
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + self.b]
        self.pos += self.b
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos, self.epoch = state["perm"], int(state["pos"]), int(state["epoch"])


def _check_schedule(lr_schedule: Callable[[int], float], step: int, lr: float) -> float:
    factor = lr_schedule(step)
    try:
        f = float(factor)
    except (TypeError, ValueError):
        raise TypeError(f"lr_schedule({step}) returned {factor!r}; it must return a number") from None
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"lr_schedule({step}) returned {f}; the lr factor must be finite and >= 0")
    return lr * f


class _Loop:
    """The training loop proper (state shared by steps, checks and checkpoints)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor] | None, dataset: Batch,
                 opt: torch.optim.Optimizer, order: DataOrder, monitor: Any,
                 history: History, own_history: bool,
                 callbacks: Sequence[Callable[[int, nn.Module, Tensor], None]], lr: float,
                 lr_schedule: Callable[[int], float] | None, device: torch.device,
                 ckpt: Path | None, checkpoint_every: int | None, config: dict[str, Any],
                 last_finite: float | None) -> None:
        self.model, self.loss_fn, self.data, self.opt = model, loss_fn, dataset, opt
        self.order, self.monitor, self.history, self.own = order, monitor, history, own_history
        self.callbacks, self.lr, self.schedule, self.device = callbacks, lr, lr_schedule, device
        self.ckpt, self.every, self.config = ckpt, checkpoint_every, config
        self.last_finite = last_finite
        self.loss_every = 1 if device.type == "cpu" else _CHECK_EVERY_ACCEL
        self.unchecked: list[tuple[int, float, Tensor]] = []
        self.saved: tuple[Path, int] | None = None

    def batch(self) -> Batch:
        idx = self.order.next()
        if idx is None:
            return self.data.to(self.device)
        return self.data[idx.to(self.data.tensors()[0].device)].to(self.device)

    def run(self, start: int, steps: int) -> None:
        for step in range(start, steps):
            lr_t = self.lr if self.schedule is None else _check_schedule(self.schedule, step, self.lr)
            for g in self.opt.param_groups:
                g["lr"] = lr_t
            batch = self.batch()
            self.opt.zero_grad(set_to_none=True)
            loss = batch.loss_value(self.model, self.loss_fn)
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError("loss_fn must return the mean loss over the batch as a scalar tensor")
            torch.autograd.backward(loss)
            if self.monitor is not None:
                self.monitor.after_backward(step, batch.as_given(), loss=loss)
            self.opt.step()
            if self.monitor is not None:
                self.monitor.after_step(step)
            loss = loss.detach()
            if self.own:
                self.history.record(step, loss=loss, lr=lr_t)
            self.unchecked.append((step, lr_t, loss))
            for cb in self.callbacks:
                cb(step, self.model, loss)
            done = step + 1
            due = self.every is not None and done % self.every == 0
            if done % self.loss_every == 0 or due or done == steps:
                self.check(params=done % _CHECK_EVERY_ACCEL == 0 or due or done == steps)
            if self.ckpt is not None and (due or done == steps):
                self.save(done)

    def check(self, *, params: bool) -> None:
        """Raise TrainingDiverged at the first non-finite loss (one sync for the pending steps)."""
        if not self.unchecked:
            return
        losses = torch.stack([v for _, _, v in self.unchecked])
        finite = torch.isfinite(losses).tolist()
        bad = next((i for i, ok in enumerate(finite) if not ok), None)
        if bad is None:
            self.last_finite = float(losses[-1])
            if params and not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                bad = len(self.unchecked) - 1
                what = "the parameters became non-finite"
        else:
            if bad > 0:
                self.last_finite = float(losses[bad - 1])
            what = f"the loss is {float(losses[bad])}"
        if bad is not None:
            step, lr_t, _ = self.unchecked[bad]
            where = ("no checkpoint was written (pass out= and checkpoint_every= to be able to "
                     "resume)" if self.saved is None else
                     f"resume from {self.saved[0]} (step {self.saved[1]}) with resume=True and a "
                     "smaller lr")
            raise TrainingDiverged(
                f"training diverged at step {step} (lr={lr_t:g}): {what}; last finite loss "
                f"{self.last_finite!r}; {where}", step=step, lr=lr_t,
                last_finite_loss=self.last_finite, checkpoint=None if self.saved is None
                else self.saved[0], history=self.history)
        self.unchecked = []

    def save(self, done: int) -> None:
        assert self.ckpt is not None
        mon_state = getattr(self.monitor, "state_dict", None)
        state = {
            "format": _FORMAT, "step": done, "config": self.config,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "data_order": self.order.state_dict(), "rng": _rng_state(self.device),
            "history": self.history.state_dict() if self.own else None,
            "monitor": mon_state() if callable(mon_state) else None,
            "last_finite_loss": self.last_finite,
        }
        save_atomic(state, self.ckpt)
        self.saved = (self.ckpt, done)
