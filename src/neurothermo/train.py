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

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Batch, as_data, concat
from neurothermo._validate import check_int, check_loss_fn, check_positive
from neurothermo.monitor.history import History
from neurothermo.train_checkpoint import CHECKPOINT as CHECKPOINT
from neurothermo.train_checkpoint import _check_config, _set_rng_state
from neurothermo.train_checkpoint import fingerprint as fingerprint
from neurothermo.train_checkpoint import load_checkpoint as load_checkpoint
from neurothermo.train_checkpoint import save_atomic as save_atomic
from neurothermo.train_loop import DataOrder as DataOrder
from neurothermo.train_loop import TrainingDiverged as TrainingDiverged
from neurothermo.train_loop import _Loop

OPTIMIZERS = ("sgd", "momentum", "adam", "gd")
_RNG_OFFSET = 1_000_003


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


def _dataset(data: Any, loss_fn: Any) -> Batch:
    """The training set as one batch in memory: ``data`` itself, or the batches of an iterable
    (a ``DataLoader``) concatenated in the order read (``train`` draws its own minibatches)."""
    return concat(as_data(data, loss_fn, name="data").batches())
