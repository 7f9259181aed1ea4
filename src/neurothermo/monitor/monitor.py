"""ThermoMonitor: watch entropic forces act during training, from what backward already produced.

Use it in any loop::

    monitor = nt.ThermoMonitor(model, loss_fn, optimizer=opt)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        monitor.after_backward(step, (x, y), loss=loss)   # reads p.grad, before the step
        opt.step()
        monitor.after_step(step)                         # reads the updated parameters
    monitor.flush(); monitor.history                     # columns: see neurothermo.monitor.names

Every ``every`` steps it records, from ``p.grad`` and the parameters only (no extra forward or
backward pass): the loss (if passed), per layer ``‖g‖²`` of the minibatch gradient and its running
expectation (bias-corrected EMA with factor ``ema``), the consecutive-layer balance ratios and
residuals, per hidden unit of every rescale symmetry the incoming and outgoing gradient energies,
every detected symmetry's charge ``J``, its predicted change over the step and the measured one,
weight norms, ``lr``, ``b`` and the temperature ``lr/b``. Every ``noise_every`` steps it adds the
entropic terms and ``Tr Σ`` from the per-sample gradient norms of the step's batch: an extra
per-sample-norm pass the first time, then read from the loop's own forward and backward
(``gradstats.passive``, armed in ``after_step`` of the step before; the extra pass again, with a
note, when the loop's pass cannot be used, e.g. two forwards in one step). Every
``sharpness_every`` steps it adds ``λ_max`` and ``lr·λ_max`` on the fixed ``data``.

**Learning rate and weight decay.** Read at every step from the ``optimizer``'s param groups when
one is given (or bound by :func:`neurothermo.train`), else from the ``lr`` / ``weight_decay``
arguments, which describe a plain SGD step ``θ' = θ − lr·(g + wd·θ)``. Charge predictions
``(1 − lr·wd)²J + lr²·gᵀAg`` are exact for plain SGD (torch ``SGD`` with momentum 0, full-batch GD
included) and are recorded only then; with momentum or Adam only the measured change is recorded
(``history.meta["notes"]`` says why).

**Monitors never change training**: everything runs under ``no_grad`` without touching ``p.grad``
in place; the extra passes for the noise and sharpness terms run inside
``torch.random.fork_rng`` and :func:`neurothermo._state.preserved_state` (BatchNorm buffers,
train flags and ``.grad`` restored). Values stay on the model's device; the history is copied to
the host every ``sync_every`` recorded steps (then rows go to the ``writer``).

**Cost** of a recorded step (no device synchronisation): one read of every gradient and one of every
parameter after the step (the parameter sums are reused as the next step's "before"); a tensor whose
units are read along two axes (a hidden layer's weight is the outgoing side of one layer of units
and the incoming side of the next) is squared once into a reused buffer and reduced twice, each
time along contiguous runs. Every charge with one entry per unit (rescale, and the scale
invariance of the weights in front of a normalisation) is read off these same sums. Only
these reductions run at the step: the small vectors they give are kept, and every derived column
(running averages, ratios, residuals, charges and their predicted and measured changes) is computed
for a whole block of steps when the history is flushed or read (``derive.py``), with identical
numbers. The reductions are memory-bound, so the relative cost is largest for wide, shallow MLPs
on a CPU (``benchmarks/bench_monitor.py`` prints it next to the bare reductions, its floor);
``every=k`` divides it by k. Symmetries with matrix charges (double rotations) use ``sym.charge``
(a matrix product per step).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Batch, as_batch
from neurothermo._state import preserved_state
from neurothermo._validate import check_int, check_positive
from neurothermo.monitor import names
from neurothermo.monitor.charges import charge_of, measure_charges, record_charges, unit_keys
from neurothermo.monitor.derive import LayerEma, Layout, RawStep, deferred_charge, derive
from neurothermo.monitor.distributed import check_sharded, full_tensors, is_sharded, unwrap
from neurothermo.monitor.history import History
from neurothermo.monitor.quantities import SquareSums
from neurothermo.monitor.settings import check_settings, fixed_data
from neurothermo.monitor.step_rule import check_binding, step_rule
from neurothermo.monitor.symmetries import Tracked, detect, track, versions
from neurothermo.monitor.writers import Writer


class MonitorWarning(UserWarning):
    """Something the monitor cannot record for this run (also listed in ``history.meta["notes"]``)."""


class ThermoMonitor:
    """Thermodynamic monitor for one model (see the module docstring for what it records).

    ``symmetries``: ``"auto"`` (``nt.find_symmetries`` on the first batch), ``None`` (none), or a
    list of ``Symmetry`` objects (``"auto"`` needs positional tensor inputs). ``data``: a fixed set
    for the population entropic terms and for sharpness, in the data model (``docs/data.md``: a
    batch ``(inputs, targets)`` or an iterable of batches; ``loss_fn=model_loss`` when the model
    returns its loss); without it the entropic terms are one-minibatch unbiased
    estimates. ``dataset_size`` / ``replacement`` describe how minibatches are drawn (set by
    ``nt.train``); unknown means i.i.d. draws. ``max_charge_numel``: charges with more entries
    (large double-rotation matrices) are recorded only through ``charge_err``.

    Args:
        model: the network being trained (a DDP wrapper is unwrapped; FSDP2 is read through
            full tensors). Its trainable parameters are θ.
        loss_fn: the training loss ``loss_fn(outputs, targets)``, mean-reduced over the batch
            (``l_B = (1/b) Σ_i l_i``), or ``model_loss`` / None when the model returns its loss.
        every: record every ``every``-th step (≥ 1).
        noise_every: add the entropic terms and ``Tr Σ`` every ``noise_every`` steps; None: never.
            A model with a part that has no per-sample gradients (the per-sample functions
            refuse it: ``PerSampleUnsupportedError``) gets one :class:`MonitorWarning` naming
            the part and the way out, and the run goes on without these columns.
        sharpness_every: add ``λ_max`` on ``data`` every ``sharpness_every`` steps; None: never.
        symmetries: ``"auto"``, None, or a list of :class:`Symmetry`, as above.
        writer: a :class:`Writer` (e.g. :class:`JSONLWriter`) that receives the rows; None.
        optimizer: the optimizer whose param groups give ``lr`` and ``wd`` at every step.
        lr: η of a plain SGD step, when no optimizer is given.
        weight_decay: torch's ``wd`` of that step (penalty ``(wd/2)‖θ‖²``, the paper's
            ``γ = wd/2``), when no optimizer is given.
        data: the fixed set, as above; None.
        dataset_size: N, the size of the training set minibatches are drawn from; None: unknown.
        replacement: whether minibatches are drawn with replacement; None: unknown (i.i.d.).
        ema: the factor of the running expectations of ``‖g‖²``, in [0, 1).
        sync_every: copy the history to the host (and write rows) every this many recorded
            steps (≥ 1).
        max_charge_numel: charges with more entries are recorded only through ``charge_err``.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``loss_fn`` not callable, ``writer`` without
            ``write``/``flush``, ``optimizer`` not a ``torch.optim.Optimizer``, non-int or
            non-number arguments.
        ValueError: ``every``, ``noise_every``, ``sharpness_every``, ``sync_every`` or
            ``dataset_size`` < 1, ``ema`` outside [0, 1), bad ``symmetries``, both ``optimizer``
            and ``lr``/``weight_decay``, ``lr`` ≤ 0, ``weight_decay`` < 0, ``data`` with fewer
            than 2 samples, ``sharpness_every`` without ``data``, a model without trainable
            parameters, noise, sharpness or ``symmetries="auto"`` on an FSDP2 model.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> monitor = nt.ThermoMonitor(model, loss_fn, noise_every=None)
        >>> history = nt.train(model, loss_fn, (x, y), lr=0.1, batch_size=8, steps=40, monitor=monitor)
        >>> bal = nt.layer_balance(history)  # the monitor's per-layer gradient energies
        >>> bal.layers
        ('0', '2')
    """

    def __init__(
        self, model: nn.Module, loss_fn: Callable[..., Tensor] | None, *, every: int = 1,
        noise_every: int | None = 50, sharpness_every: int | None = None,
        symmetries: str | Sequence[Any] | None = "auto", writer: Writer | None = None,
        optimizer: torch.optim.Optimizer | None = None, lr: float | None = None,
        weight_decay: float | None = None, data: tuple[Tensor, Tensor] | None = None,
        dataset_size: int | None = None, replacement: bool | None = None, ema: float = 0.99,
        sync_every: int = 100, max_charge_numel: int = 4096,
    ) -> None:
        (self.every, self.noise_every, self.sharpness_every, self.sync_every,
         self.max_charge_numel) = check_settings(
            model, loss_fn, every=every, noise_every=noise_every, sharpness_every=sharpness_every,
            sync_every=sync_every, max_charge_numel=max_charge_numel, ema=ema,
            symmetries=symmetries, writer=writer)
        model, self._dist = unwrap(model)  # DDP: the inner module; reductions over its group
        self._sharded = is_sharded(model)  # FSDP2: read full tensors (distributed.py)
        if self._sharded:
            check_sharded(symmetries, noise_every, sharpness_every)
        if self._dist is not None and self._dist.rank != 0:
            writer = None  # rank 0 writes the rows; every rank keeps the same history
        self.model, self.loss_fn, self.writer, self.ema = model, loss_fn, writer, float(ema)
        self.data = fixed_data(data, loss_fn, model, self.sharpness_every)
        self._sharpness: Any = _make_tracker(self) if self.sharpness_every is not None else None
        self._opt: torch.optim.Optimizer | None = None
        self._lr: float | None = None
        self._wd: float | None = None
        self._n: int | None = None
        self._replacement: bool | None = None
        self.bind(optimizer, lr=lr, weight_decay=weight_decay, dataset_size=dataset_size,
                  replacement=replacement)

        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._names = list(self._params)
        self._psums: tuple[tuple[int, ...], SquareSums] | None = None
        self._scratch_grads: dict[Any, Tensor] = {}
        self._scratch_params: dict[Any, Tensor] = {}
        self._raw: list[RawStep] = []  # recorded steps whose derived columns wait for flush()
        self._unit_keys: list[tuple[str, int, tuple[int, ...] | None]] = []
        if not self._params:
            raise ValueError("model has no trainable parameters to monitor")
        owners: dict[str, int] = {}
        for n in self._params:
            owners.setdefault(n.rpartition(".")[0] or "(root)", len(owners))
        self.layers = list(owners)
        self._layer_cols = [(names.grad_sq(n), names.grad_sq_ema(n), names.weight_norm(n))
                            for n in self.layers]
        self._pair_cols = [(names.layer_ratio(a, b), names.layer_residual(a, b))
                           for a, b in zip(self.layers, self.layers[1:])]
        self._param_layer = [owners[n.rpartition(".")[0] or "(root)"] for n in self._params]
        self._sym_request = symmetries
        self._tracked: list[Tracked] | None = None
        self._history = History(meta={"layers": self.layers, "every": self.every,
                                     "noise_every": self.noise_every,
                                     "sharpness_every": self.sharpness_every, "notes": []})
        self._history.add_producer(self._drain)
        self._warned: set[str] = set()
        self._capture: Any = None  # gradstats.passive.BackwardCapture for the noise terms
        self._noise_refused = False  # the model has no per-sample gradients: no noise columns
        self._passive_ready = False
        if self.noise_every is not None and self.data is None:
            self._capture = _make_capture(self)
        self._ema_layer: Tensor | None = None
        self._count = 0
        self._emitted = -1
        self._pending: tuple[int, dict[str, Any]] | None = None

    @property
    def history(self) -> History:
        """The recorded columns (see the module docstring); derived columns are brought up to date."""
        self._drain()
        return self._history

    # ---- configuration -------------------------------------------------------------------------
    def bind(
        self, optimizer: torch.optim.Optimizer | None = None, *, lr: float | None = None,
        weight_decay: float | None = None, dataset_size: int | None = None,
        replacement: bool | None = None,
    ) -> ThermoMonitor:
        """Tell the monitor how training steps (optimizer or lr/wd) and how batches are drawn."""
        check_binding(optimizer, lr, weight_decay)
        self._opt = optimizer or self._opt
        if lr is not None:
            self._lr = check_positive("lr", lr)
        if weight_decay is not None:
            self._wd = check_positive("weight_decay", weight_decay, allow_zero=True)
        if dataset_size is not None:
            self._n = check_int("dataset_size", dataset_size)
        if replacement is not None:
            self._replacement = bool(replacement)
        return self

    def _note(self, key: str, text: str) -> None:
        """Record ``text`` in ``history.meta["notes"]`` once and warn once; a note already there
        (restored from a checkpoint) is neither repeated nor warned about again."""
        if key in self._warned:
            return
        self._warned.add(key)
        notes = self._history.meta["notes"]
        if text in notes:
            return
        notes.append(text)
        warnings.warn(f"ThermoMonitor: {text}", MonitorWarning, stacklevel=3)

    @contextmanager
    def _measuring(self) -> Iterator[None]:
        """Extra passes: no effect on RNG streams, BatchNorm buffers, train flags or ``.grad``."""
        dev = next(iter(self._params.values())).device
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), preserved_state(self.model):
            yield

    # ---- the two calls -------------------------------------------------------------------------
    def after_backward(self, step: int, batch: Any, *, loss: Tensor | None = None) -> None:
        """Record what ``p.grad`` holds for ``step`` (call after backward, before the optimizer step).

        ``batch``: the batch the loss was computed on, in the data model (``docs/data.md``):
        ``(inputs, targets)`` with inputs a tensor or a dict of tensors, or the inputs alone when
        ``loss_fn`` is ``model_loss``."""
        check_int("step", step, minimum=0)
        if self._pending is not None:
            raise RuntimeError(
                f"after_step({self._pending[0]}) was not called before after_backward({step})")
        batch = as_batch(batch, self.loss_fn, name="batch", finite=False)
        if self._tracked is None:
            self._tracked = self._init_symmetries(batch.inputs)
        lr, wd, not_exact = step_rule(self._opt, self._lr, self._wd)
        if lr is None:
            self._note("lr", "no lr known (pass optimizer= or lr=): temperature, charge "
                       "predictions and entropic terms are not recorded")
        elif not_exact and self._tracked:
            self._note("exact", f"charge predictions not recorded: {not_exact}")
        values: dict[str, Any] = {}
        recorded = step % self.every == 0
        with torch.no_grad():
            if loss is not None:
                loss = loss.detach() if self._dist is None else self._dist.mean(loss)
                values[names.LOSS] = loss
            if recorded:
                self._record_grads(step, values, batch, lr, wd, predict=not_exact is None)
            if (lr is not None and self.noise_every is not None and not self._noise_refused
                    and step % self.noise_every == 0):
                values.update(_entropic_terms(self, batch, loss, lr, wd, step))
            if self._sharpness is not None and step % self.sharpness_every == 0:  # type: ignore[operator]
                values.update(self._measure_sharpness(step, lr))
        if self._capture is not None and self._capture.armed:
            self._capture.disarm()  # armed for a step that did not measure noise
        self._pending = (step, values)

    def _measure_sharpness(self, step: int, lr: float | None) -> dict[str, Any]:
        opt = self._opt
        momentum = float(opt.param_groups[0].get("momentum", 0.0)) if opt is not None else 0.0
        with self._measuring(), torch.enable_grad():
            r = self._sharpness.update(self.model, self.loss_fn, self.data, step=step,
                                       lr=lr, momentum=momentum)
        out: dict[str, Any] = {names.SHARPNESS: r.lambda_max}
        if r.lr_lambda_max is not None:
            out[names.LR_SHARPNESS] = r.lr_lambda_max
        return out

    def _param_sums(self) -> SquareSums:
        """Squared-entry sums of the parameters, reused while no parameter changed in place."""
        v = versions(self._params)
        if self._psums is None or self._psums[0] != v:
            params = full_tensors(self._params) if self._sharded else self._params
            sums = SquareSums(params, self._scratch_params).prepare(self._unit_keys, self._names)
            self._psums = (v, sums)
        return self._psums[1]

    def _charge(self, t: Tracked) -> Tensor:
        """A charge that is not derived from the shared sums (``derive.deferred_charge``)."""
        return charge_of(t, self._params, self._sharded)

    def _record_grads(self, step: int, values: dict[str, Any], batch: Batch,
                      lr: float | None, wd: float, *, predict: bool) -> None:
        """The reductions of this step (kept in ``self._raw``) and the eagerly computed charges."""
        grads = {n: p.grad for n, p in self._params.items()}
        if self._sharded:
            grads = full_tensors(grads)
        gsums = SquareSums(grads, self._scratch_grads).prepare(self._unit_keys, self._names)
        b = batch.size * (1 if self._dist is None else self._dist.world)  # the global batch
        self._raw.append(RawStep(step=step, lr=lr, wd=wd, batch_size=b,
                                 predict=predict, grads=gsums, before=self._param_sums()))
        record_charges(self._tracked or (), self._charge, grads, lr, wd, predict=predict,
                       max_charge_numel=self.max_charge_numel, values=values)

    def after_step(self, step: int, *, loss: Tensor | None = None) -> None:
        """Record the measured charge changes of ``step`` (call right after ``optimizer.step()``).

        ``loss`` may be passed here instead of to :meth:`after_backward`.
        """
        if self._pending is None or self._pending[0] != step:
            raise RuntimeError(
                f"after_step({step}) without after_backward({step}): call after_backward(step, "
                "batch) after loss.backward() and before optimizer.step()")
        _, values = self._pending
        self._pending = None
        if loss is not None and names.LOSS not in values:
            values[names.LOSS] = loss.detach() if self._dist is None else self._dist.mean(loss)
        if step % self.every == 0 and self._tracked:
            with torch.no_grad():
                if any(deferred_charge(t) for t in self._tracked):
                    self._raw[-1].after = self._param_sums()
                measure_charges(self._tracked, self._charge, max_charge_numel=self.max_charge_numel,
                                values=values)
        self._history.record(step, values)
        if step % (self.every * self.sync_every) == 0:
            self.flush()
        if (self._capture is not None and self._passive_ready
                and (step + 1) % self.noise_every == 0):  # type: ignore[operator]
            self._capture.arm()  # the next step's forward and backward give the per-sample norms

    def reduce_across_ranks(self) -> None:
        """Reduce over the default process group (a framework that wraps the model in DDP itself
        hands callbacks the inner module): each rank then records the global batch's columns, and
        only rank 0 keeps its writer. Without a group of several ranks, or when the monitor was
        built on a DDP model, nothing changes."""
        from neurothermo.monitor.distributed import default_group

        if self._dist is not None:
            return
        self._dist = default_group()
        if self._dist is not None and self._dist.rank != 0:
            self.writer = None

    # ---- output --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Derive the pending columns, copy values to the host and hand new rows to the writer."""
        self._drain()
        self._history.flush()
        if self.writer is not None:
            rows = self._history.to_dicts(after_step=self._emitted)
            if rows:
                self.writer.write(rows, self._history.meta)
                self._emitted = rows[-1]["step"]
            self.writer.flush()

    def close(self) -> None:
        """Flush, remove the hooks armed for the next noise step, then close the writer if it can
        be closed. The model is left as it was before the monitor: a later forward is not
        recorded."""
        self.flush()
        if self._capture is not None:
            self._capture.disarm()
        close = getattr(self.writer, "close", None)
        if callable(close):
            close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue recording identically after a checkpoint resume."""
        self.flush()
        return {"history": self._history.state_dict(), "ema_layer": self._ema_layer,
                "count": self._count, "emitted": self._emitted,
                "units": {t.index: (t.ema_in, t.ema_out) for t in self._tracked or ()},
                "passive_ready": self._passive_ready}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history.load_state_dict(state["history"])
        self._raw = []
        self._ema_layer, self._count = state["ema_layer"], int(state["count"])
        self._emitted, self._pending, self._psums = int(state["emitted"]), None, None
        self._units_state = state.get("units", {})
        # Whether the model passed the full per-sample checks: then the noise steps after the
        # resume read the loop's own pass, as the uninterrupted run did (with Dropout an extra
        # pass would draw other masks and give other numbers).
        self._passive_ready = bool(state.get("passive_ready", False))
        for t in self._tracked or ():
            t.ema_in, t.ema_out = self._units_state.get(t.index, (None, None))
            t.forget()
        steps = [int(s) for c in self._history.columns for s in self._history.steps(c)[-1:]]
        last = max(steps, default=-1)
        truncate = getattr(self.writer, "truncate", None)
        if callable(truncate):
            truncate(last)
            self._emitted = min(self._emitted, last)

    def _drain(self) -> None:
        """Compute the derived columns of the steps recorded since the last drain (``derive.py``)."""
        if not self._raw:
            return
        block, self._raw = self._raw, []
        with torch.no_grad():
            layout = Layout(self._names, self._param_layer, self._layer_cols, self._pair_cols,
                            self.ema, self.max_charge_numel)
            cols, ema = derive(layout, self._tracked or (), LayerEma(self._ema_layer, self._count), block)
            self._ema_layer, self._count = ema.avg, ema.count
            for name, (steps, vals) in cols.items():
                self._history.extend(name, steps, vals)

    def _init_symmetries(self, inputs: Tensor) -> list[Tracked]:
        with self._measuring(), torch.no_grad():
            syms = detect(self.model, inputs, self._sym_request,
                          note=lambda text: self._note("symmetries", text))
        tracked = track(syms, self._params)
        self._unit_keys = unit_keys(tracked)  # (prepare() reads each tensor once for all its axes)
        self._psums = None
        self._history.meta["symmetries"] = [t.describe() for t in tracked]
        for t in tracked:  # restore unit EMAs after a resume
            t.ema_in, t.ema_out = getattr(self, "_units_state", {}).get(t.index, (None, None))
        return tracked


def _entropic_terms(mon: ThermoMonitor, batch: Batch, loss: Tensor | None,
                    lr: float, wd: float, step: int) -> dict[str, Tensor]:
    from neurothermo.monitor.noise import NoiseSetup, entropic_terms

    raw = mon._raw[-1] if mon._raw and mon._raw[-1].step == step else None
    grad_sq = raw.grads.per_tensor(mon._names).sum() if raw is not None else None
    setup = NoiseSetup(mon.model, mon.loss_fn, mon.data, mon._params, mon._n, mon._replacement,
                       mon._capture, mon._note, mon._measuring, dist=mon._dist)
    res = entropic_terms(setup, batch, loss, lr, wd, step_grad_sq=grad_sq)
    if res.method is not None:
        mon._history.meta["entropic"] = res.method
    mon._passive_ready = mon._passive_ready or res.passive_ready
    mon._noise_refused = mon._noise_refused or res.refused  # (the note said why, once)
    return res.columns


def _make_capture(mon: ThermoMonitor) -> Any:
    from neurothermo.monitor.noise import make_capture

    return make_capture(mon.model, mon._params, mon._note)


def _make_tracker(mon: ThermoMonitor) -> Any:
    from neurothermo.monitor.noise import make_sharpness_tracker

    return make_sharpness_tracker()

