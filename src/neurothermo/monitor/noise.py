"""The monitor's occasional measurements: entropic terms / Tr Σ and sharpness.

Called at ``noise_every`` / ``sharpness_every`` steps. Every extra pass runs inside the monitor's
``_measuring()`` context (RNG streams, BatchNorm buffers, train flags and ``.grad`` restored
afterwards); reading the loop's own pass needs none.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Batch
from neurothermo._state import ModeWarning, active_dropout, has_train_mode_batchnorm
from neurothermo.monitor import names
from neurothermo.monitor.quantities import batch_noise_terms, squared_norm

LOSS, DISC, NOISE, TRACE = names.ENTROPIC
TOTAL = "entropic/total"

Note = Callable[[str, str], None]  # note(key, text): recorded once in meta["notes"], warned once


@dataclass(frozen=True)
class NoiseSetup:
    """What the monitor hands to a noise measurement (its explicit interface to this module).

    ``params``: the trainable parameters by name (their ``.grad`` is the step's gradient);
    ``dataset_size`` N and ``replacement`` as told to the monitor (``None``: unknown — then the
    minibatches are taken as drawn with replacement); ``capture``: the passive per-sample-norm
    capture or ``None``; ``note``: records a note; ``measuring()``: the context every extra pass
    runs in (RNG, BatchNorm buffers, train flags and ``.grad`` restored afterwards); ``dist``: the
    cross-rank sizes and gathers under DDP (each rank holds its own samples), or ``None``."""

    model: nn.Module
    loss_fn: Any
    data: Any
    params: dict[str, nn.Parameter]
    dataset_size: int | None
    replacement: bool | None
    capture: Any
    note: Note
    measuring: Callable[[], AbstractContextManager[None]]
    dist: Any = None  # the cross-rank reductions under DDP (monitor.distributed), else None


@dataclass(frozen=True)
class NoiseTerms:
    """A noise measurement's result: the columns, how they were measured (``meta["entropic"]``,
    ``None`` when nothing was), whether the model passed the full per-sample checks (then
    later steps may read the loop's own pass), and whether it was refused (a model part without
    per-sample gradients: the monitor stops measuring noise for the run)."""

    columns: dict[str, Tensor]
    method: str | None = None
    passive_ready: bool = False
    refused: bool = False  # the model has no per-sample gradients: no noise step will have any


def _refused(mon: NoiseSetup, e: Exception) -> NoiseTerms:
    """The run goes on without the noise columns; the note (a warning, once) gives the reason and
    the way out from the per-sample refusal."""
    mon.note("noise_refused", f"entropic terms not recorded in this run: {e}")
    return NoiseTerms({}, refused=True)


def entropic_terms(mon: NoiseSetup, batch: Batch, loss: Tensor | None,
                   lr: float, wd: float, step_grad_sq: Tensor | None = None) -> NoiseTerms:
    """``entropic/{loss, discretization, noise, total, trace_sigma}`` for the current parameters.

    With ``mon.data``: the exact population decomposition over that data
    (:func:`neurothermo.entropic_decomposition`, minibatches of the current batch size, drawn as
    ``mon`` was told, with replacement when it was not). Without: unbiased one-minibatch
    estimates from the per-sample squared gradient norms of ``batch``
    (:func:`neurothermo.monitor.quantities.batch_noise_terms`); ``entropic/loss`` is then the
    minibatch loss passed to ``after_backward`` (omitted when none was passed). The norms are
    measured by an extra pass the first time, then read from the caller's own forward and
    backward of the step (``gradstats.passive``, armed by ``after_step`` of the step before),
    with the extra pass again whenever a capture is not usable (a note says why).
    ``step_grad_sq``: ``‖g_B‖²`` when the step's reductions already give it.
    """
    b = batch.size
    replacement = True if mon.replacement is None else mon.replacement
    bn = has_train_mode_batchnorm(mon.model)
    if bn is not None:
        mon.note("noise_bn", f"entropic terms not recorded: BatchNorm {bn!r} is in train mode, which "
                 "couples the samples of a batch, so per-sample gradients and Σ are undefined")
        return NoiseTerms({})
    if mon.data is not None:
        try:
            from neurothermo.entropic import entropic_decomposition
            from neurothermo.gradstats import PerSampleUnsupportedError
        except ImportError as e:
            raise ImportError("ThermoMonitor(data=...) entropic terms need neurothermo.entropic") from e
        try:
            with mon.measuring(), torch.enable_grad():
                d = entropic_decomposition(mon.model, mon.loss_fn, mon.data, lr=lr, batch_size=b,
                                           replacement=replacement, weight_decay=wd)
        except PerSampleUnsupportedError as e:
            return _refused(mon, e)
        f64 = torch.float64
        return NoiseTerms(
            {LOSS: torch.tensor(d.loss, dtype=f64), DISC: torch.tensor(d.discretization, dtype=f64),
             NOISE: torch.tensor(d.noise, dtype=f64), TOTAL: torch.tensor(d.total, dtype=f64),
             TRACE: torch.tensor(d.trace_sigma, dtype=f64)},
            method=f"exact over data (N={d.n_samples})")
    sizes = None
    if mon.dist is not None:  # every rank takes part in the gathers below, or none does
        sizes = mon.dist.sizes(b, next(iter(mon.params.values())).device)
        if len(set(sizes)) > 1:
            mon.note("noise_sizes", f"entropic terms not recorded at steps whose ranks hold "
                     f"unequal batches ({sizes}): DDP's mean of rank means is then not the global "
                     "batch's gradient; give every rank the same batch size (DistributedSampler)")
            return NoiseTerms({})
        b = sum(sizes)
    if b < 2:
        mon.note("noise_b1", "entropic terms need b >= 2 per batch (or data=); not recorded")
        return NoiseTerms({})
    try:
        from neurothermo.gradstats import PerSampleUnsupportedError, per_sample_grad_norms
    except ImportError as e:
        raise ImportError(
            "ThermoMonitor noise terms need neurothermo.gradstats (per_sample_grad_norms); "
            "pass noise_every=None to monitor without them"
        ) from e
    params = list(mon.params.values())
    grads = [p.grad for p in params]
    grad_sq = step_grad_sq if step_grad_sq is not None else squared_norm([g for g in grads if g is not None])
    decayed = None
    if wd:
        decayed = squared_norm([p.detach() * wd if g is None else g + wd * p.detach()
                                for g, p in zip(grads, params)])
    sample_sq = None
    passive_ready = False
    cap = mon.capture
    if cap is not None and cap.armed:  # read from the caller's own forward and backward
        sample_sq = cap.norms(batch)
        if sample_sq is None:
            mon.note("passive", f"entropic terms measured with an extra pass ({cap.reason})")
    if sample_sq is None:
        if drop := active_dropout(mon.model):
            mon.note("noise_dropout", f"entropic terms measured with an extra pass draw their own "
                     f"Dropout masks ({', '.join(drop[:3])}), not the training step's")
        try:
            with mon.measuring(), torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", ModeWarning)  # said once, as a note, above
                norms = per_sample_grad_norms(mon.model, mon.loss_fn, batch)
        except PerSampleUnsupportedError as e:
            return _refused(mon, e)
        assert isinstance(norms, Tensor)  # by_parameter=False gives one tensor [b]
        sample_sq = norms.detach()
        passive_ready = True  # the model passed the full checks: later steps may capture
    if sizes is not None and mon.dist is not None:  # each rank holds its own samples' norms
        sample_sq = mon.dist.gather(sample_sq, sizes)
    terms = batch_noise_terms(sample_sq, grad_sq, lr=lr, dataset_size=mon.dataset_size,
                              replacement=replacement, grad_sq_decayed=decayed)
    out = {DISC: terms["discretization"], NOISE: terms["noise"], TRACE: terms["trace_sigma"]}
    if loss is not None:
        base = loss.detach()
        if wd:
            base = base + (wd / 2) * squared_norm(params)
        out[LOSS] = base
        out[TOTAL] = base + terms["discretization"] + terms["noise"]
    return NoiseTerms(out, method="unbiased one-minibatch estimate", passive_ready=passive_ready)


def make_capture(model: nn.Module, params: dict[str, nn.Parameter], note: Note) -> Any:
    """A passive per-sample-norm capture for the noise terms, or None (with a note) if unusable."""
    try:
        from neurothermo.gradstats.passive import BackwardCapture, capturable
    except ImportError:
        return None
    reason = capturable(model, params)
    if reason is not None:
        note("capture", f"entropic terms measured with an extra pass: {reason}")
        return None
    return BackwardCapture(model, params)


def make_sharpness_tracker() -> Any:
    """A :class:`neurothermo.SharpnessTracker` on the monitor's fixed ``data`` (issue 7)."""
    try:
        from neurothermo.curvature import SharpnessTracker
    except ImportError as e:
        raise ImportError(
            "ThermoMonitor(sharpness_every=...) needs neurothermo.curvature (SharpnessTracker)"
        ) from e
    return SharpnessTracker()
