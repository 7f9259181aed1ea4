"""``nt.train``: a deterministic, resumable training loop for SGD, momentum, Adam and full-batch GD.

Conventions (docs/theory.md): ``loss_fn(outputs, targets)`` is mean-reduced over the batch, so the
step is ``θ ← θ − lr·(g_B + wd·θ)`` for ``"sgd"`` with ``g_B`` the minibatch gradient and
``weight_decay = wd`` torch's (penalty ``(wd/2)‖θ‖²``, the paper's ``γ = wd/2``). The temperature
of the noise is ``lr/b``.

**Data order.** ``data`` holds N samples in the data model (``docs/data.md``): ``(inputs,
targets)`` with inputs a tensor or a dict of tensors (``loss_fn=model_loss`` when the model returns
its loss), or an iterable of such batches (a ``DataLoader``), read once into memory and concatenated
in the order read: ``train`` draws its own minibatches from the N samples, so that runs are
deterministic and resumable. Without replacement every epoch is
a fresh permutation cut into ``N // b`` batches of exactly ``b`` samples (the remainder of the
permutation is dropped, so the temperature ``lr/b`` is the same at every step); with
``replacement=True`` every batch is ``b`` indices drawn uniformly and independently;
``optimizer="gd"`` uses the whole dataset at every step. The order comes from a private
``torch.Generator`` seeded with ``seed``; the global torch RNG (dropout and other random layers)
runs inside ``torch.random.fork_rng`` seeded with ``seed + 1000003``, so the caller's global RNG
state is left as it was and a monitor's extra passes cannot shift any random stream.

**Checkpoints.** With ``out`` (a folder) the state is saved to ``out/checkpoint.pt`` every
``checkpoint_every`` steps and at the end: model, optimizer, data order (generator state, current
permutation and position), global RNG states, the history and the monitor's state. Each write goes
to a temporary file first and is renamed into place, so a crash never leaves a torn checkpoint.
``resume=True`` continues from that checkpoint (or starts afresh when there is none) and reaches
bit-for-bit the same parameters — and, with a :class:`~neurothermo.ThermoMonitor`, the same
history — as an uninterrupted run on the same machine and thread count. A resume is refused, with
a message, when the data (its values, not only its size), the model's structure or a setting
differs from the run that wrote the checkpoint, or when the checkpoint file is damaged.
``lr_schedule`` is a function ``step → factor`` (the learning rate at step t is
``lr·lr_schedule(t)``); pass the same one when resuming. ``out/history.jsonl`` is written at the end.

**Divergence.** Non-finite losses (checked every step on CPU, every 20 steps on accelerators, to
avoid a device synchronisation per step) or parameters (checked every 20 steps, at every
checkpoint and at the end) stop training with :class:`TrainingDiverged`, naming the step, the
learning rate, the last finite loss and the checkpoint to resume from.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Batch, as_data, concat
from neurothermo._validate import check_int, check_loss_fn, check_positive
from neurothermo.monitor.history import History

OPTIMIZERS = ("sgd", "momentum", "adam", "gd")
CHECKPOINT = "checkpoint.pt"
_RNG_OFFSET = 1_000_003
_CHECK_EVERY_ACCEL = 20
_FORMAT = 2  # 2: the config holds a fingerprint of the data and the model structure


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


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float,
                   momentum: float) -> torch.optim.Optimizer:
    """torch optimizer for ``name``; ``weight_decay`` is coupled (added to the gradient) in all four."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "momentum":
        if not 0 < momentum < 1:
            raise ValueError(f"optimizer='momentum' needs 0 < momentum < 1, got {momentum}")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if momentum != 0:
        raise ValueError(f"momentum={momentum} is only used by optimizer='momentum' (got {name!r})")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_schedule(lr_schedule: Callable[[int], float], step: int, lr: float) -> float:
    factor = lr_schedule(step)
    try:
        f = float(factor)
    except (TypeError, ValueError):
        raise TypeError(f"lr_schedule({step}) returned {factor!r}; it must return a number") from None
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"lr_schedule({step}) returned {f}; the lr factor must be finite and >= 0")
    return lr * f


def train(
    model: nn.Module, loss_fn: Callable[..., Tensor] | None, data: Any, *,
    optimizer: str = "sgd", lr: float, batch_size: int | None = None, steps: int,
    weight_decay: float = 0.0, momentum: float = 0.0, replacement: bool = False,
    lr_schedule: Callable[[int], float] | None = None, seed: int = 0, monitor: Any = None,
    checkpoint_every: int | None = None, out: str | os.PathLike[str] | None = None,
    resume: bool = False, callbacks: Sequence[Callable[[int, nn.Module, Tensor], None]] = (),
) -> History:
    """Train ``model`` for ``steps`` steps and return the history (see the module docstring).

    ``monitor`` is a :class:`~neurothermo.ThermoMonitor` (bound to the optimizer, dataset size and
    sampling here; the returned history is then ``monitor.history``) or any object with
    ``after_backward(step, batch, loss=...)`` and ``after_step(step)``. ``callbacks`` are called
    as ``cb(step, model, loss)`` after every step (raise ``KeyboardInterrupt`` there to stop). The
    model is put in train mode. Returns a :class:`History` with ``loss`` and ``lr`` per step.

    Args:
        model: the network, trained in place (its device is used for the data).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: the N training samples, as described in the module docstring.
        optimizer: ``"sgd"``, ``"momentum"`` (heavy ball), ``"adam"`` or ``"gd"`` (full batch).
        lr: the learning rate η (> 0).
        batch_size: b (≥ 1; ≤ N without replacement); required except for ``"gd"``.
        steps: the number of optimizer steps (≥ 1).
        weight_decay: torch's coupled ``wd`` (≥ 0), penalty ``(wd/2)‖θ‖²``, the paper's
            ``γ = wd/2``.
        momentum: β in (0, 1) for ``"momentum"``; 0 for the others.
        replacement: draw each batch with replacement instead of from epoch permutations.
        lr_schedule: ``step -> factor`` (the lr at step t is ``lr·lr_schedule(t)``); None: constant.
        seed: seed (≥ 0) of the data order and of the global RNG inside training.
        monitor: a :class:`ThermoMonitor`, or an object with ``after_backward`` and
            ``after_step``; None.
        checkpoint_every: write ``out/checkpoint.pt`` every this many steps (≥ 1; needs ``out``).
        out: the folder for checkpoints and ``history.jsonl``; None: nothing is written.
        resume: continue from ``out/checkpoint.pt`` if it exists (needs ``out``).
        callbacks: functions ``cb(step, model, loss)`` called after every step.

    Returns:
        The run's :class:`History` (the monitor's, when one is given): ``loss`` and ``lr`` per
        step, plus the monitor's columns; ``meta["train"]`` holds the settings.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``loss_fn`` not callable, a ``monitor``
            without ``after_backward``/``after_step``, an ``lr_schedule`` that is not callable or
            returns a non-number, non-number or non-int settings, data of the wrong type.
        ValueError: an unknown ``optimizer``, ``lr`` ≤ 0, ``steps`` < 1, ``seed`` < 0,
            ``weight_decay`` < 0, a ``momentum`` that does not fit the optimizer, a
            ``batch_size`` missing, < 1 or (without replacement) > N, ``"gd"`` with
            ``batch_size`` ≠ N or ``replacement``, ``checkpoint_every`` or ``resume`` without
            ``out``, a model without trainable parameters or with non-finite ones, a loss that
            is not a mean-reduced scalar, an ``lr_schedule`` factor that is negative or not
            finite, a damaged checkpoint or one written by a different run (data, model or
            settings).
        TrainingDiverged: a non-finite loss or parameter during training (it names the step
            and the checkpoint to resume from).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> history = nt.train(model, loss_fn, (x, y), lr=0.1, batch_size=8, steps=20)
        >>> int(history.steps("loss")[-1])  # the loss of every step is recorded
        19
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_loss_fn(loss_fn)
    dataset = _dataset(data, loss_fn)
    n = dataset.size
    lr = check_positive("lr", lr)
    steps = check_int("steps", steps)
    seed = check_int("seed", seed, minimum=0)
    wd = check_positive("weight_decay", weight_decay, allow_zero=True)
    momentum = check_positive("momentum", momentum, allow_zero=True)
    if optimizer == "gd":
        if batch_size not in (None, n):
            raise ValueError(f"optimizer='gd' uses the full batch (N={n}); got batch_size={batch_size}")
        if replacement:
            raise ValueError("optimizer='gd' uses the full batch; replacement=True makes no sense")
        b = n
    else:
        if batch_size is None:
            raise ValueError(f"batch_size is required for optimizer={optimizer!r} (or use 'gd')")
        b = check_int("batch_size", batch_size)
        if not replacement and b > n:
            raise ValueError(
                f"batch_size={b} exceeds the dataset size N={n}; use batch_size <= N, "
                "replacement=True or optimizer='gd'")
    if lr_schedule is not None and not callable(lr_schedule):
        raise TypeError(f"lr_schedule must be a function step -> lr factor, got {lr_schedule!r}")
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every)
        if out is None:
            raise ValueError("checkpoint_every needs out= (the folder to write checkpoints to)")
    if resume and out is None:
        raise ValueError("resume=True needs out= (the folder holding checkpoint.pt)")
    if monitor is not None and not (callable(getattr(monitor, "after_backward", None))
                                    and callable(getattr(monitor, "after_step", None))):
        raise TypeError("monitor must have after_backward(step, batch, loss=) and after_step(step)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter {name!r} holds NaN or Inf before training; re-initialise")
    device = params[0].device
    opt = make_optimizer(params, optimizer, lr, wd, momentum)
    order = DataOrder(n, b, replacement=replacement, full=optimizer == "gd", seed=seed)
    config = {"optimizer": optimizer, "lr": lr, "batch_size": b, "weight_decay": wd,
              "momentum": momentum, "replacement": bool(replacement), "seed": seed, "n": n}
    if out is not None:  # only a run that checkpoints or resumes needs to recognise its inputs
        config["fingerprint"] = fingerprint(model, dataset.tensors())
    if monitor is not None and callable(getattr(monitor, "bind", None)):
        monitor.bind(opt, dataset_size=n, replacement=replacement)
    mon_history = getattr(monitor, "history", None)
    history = mon_history if isinstance(mon_history, History) else History()
    own_history = history is not mon_history
    history.meta.setdefault("train", config)
    folder = None if out is None else Path(out)
    ckpt = None if folder is None else folder / CHECKPOINT
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    model.train()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed + _RNG_OFFSET)
        start, last_finite = 0, None
        if resume and ckpt is not None and ckpt.exists():
            state = load_checkpoint(ckpt, device)
            _check_config(state, config, steps, ckpt)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            order.load_state_dict(state["data_order"])
            _set_rng_state(state["rng"], device)
            if own_history:
                history.load_state_dict(state["history"])
            elif state.get("monitor") is not None and callable(getattr(monitor, "load_state_dict", None)):
                monitor.load_state_dict(state["monitor"])
            start, last_finite = int(state["step"]), state["last_finite_loss"]
        loop = _Loop(model, loss_fn, dataset, opt, order, monitor, history, own_history, callbacks,
                     lr, lr_schedule, device, ckpt, checkpoint_every, config, last_finite)
        loop.run(start, steps)
    if monitor is not None and callable(getattr(monitor, "flush", None)):
        monitor.flush()
    if folder is not None:
        history.to_jsonl(folder / "history.jsonl")
    return history


def load_checkpoint(ckpt: Path, device: torch.device) -> dict[str, Any]:
    """``torch.load`` (weights only) of a checkpoint, naming the file and the damage on failure."""
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, UnpicklingError
        size = ckpt.stat().st_size if ckpt.exists() else 0
        raise ValueError(
            f"cannot resume: {ckpt} ({size} bytes) is damaged or truncated and cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            "delete it to start afresh, or resume from a copy of an intact checkpoint") from None
    if not isinstance(state, dict):
        raise ValueError(f"cannot resume: {ckpt} holds a {type(state).__name__}, not a "
                         "neurothermo checkpoint")
    return state


def fingerprint(model: nn.Module, tensors: Sequence[Tensor]) -> dict[str, str]:
    """What a resume must match: a SHA-256 of the training data's values (shapes, dtypes and
    bytes of every tensor, in order) and of the model's structure (module types, parameter and
    buffer names, shapes and dtypes — not their values, which the checkpoint restores)."""
    import hashlib

    data = hashlib.sha256()
    for t in tensors:
        data.update(f"{tuple(t.shape)}{t.dtype}".encode())
        data.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    structure = hashlib.sha256()
    for name, mod in model.named_modules():
        structure.update(f"{name}:{type(mod).__qualname__};".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        structure.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return {"data": data.hexdigest(), "model": structure.hexdigest()}


def _dataset(data: Any, loss_fn: Any) -> Batch:
    """The training set as one batch in memory: ``data`` itself, or the batches of an iterable
    (a ``DataLoader``) concatenated in the order read (``train`` draws its own minibatches)."""
    return concat(as_data(data, loss_fn, name="data").batches())


def _check_config(state: dict[str, Any], config: dict[str, Any], steps: int, ckpt: Path) -> None:
    if state.get("format") != _FORMAT:
        raise ValueError(f"{ckpt} is not a neurothermo checkpoint of format {_FORMAT}")
    saved = state.get("config", {}).get("fingerprint", {})
    for what, why in (("model", "a model of another structure"),
                      ("data", "other training data (same size or not)")):
        if saved.get(what) != config["fingerprint"][what]:
            raise ValueError(
                f"cannot resume from {ckpt}: this call passes {why} than the run that wrote it "
                f"({what} fingerprint {str(saved.get(what))[:12]} there, "
                f"{config['fingerprint'][what][:12]} here); pass the same {what}, or another out= "
                "folder to start a new run")
    for k, v in config.items():
        if k == "fingerprint":
            continue
        if state["config"].get(k) != v:
            raise ValueError(
                f"cannot resume from {ckpt}: it was written with {k}={state['config'].get(k)!r}, "
                f"this call has {k}={v!r}; use the same settings or another out= folder")
    if int(state["step"]) > steps:
        raise ValueError(f"{ckpt} is at step {state['step']}, past steps={steps}")


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
