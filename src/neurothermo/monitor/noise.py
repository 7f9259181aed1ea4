"""The monitor's occasional measurements: entropic terms / Tr Σ and sharpness.

Called at ``noise_every`` / ``sharpness_every`` steps. Every extra pass runs inside the monitor's
``_measuring()`` context (RNG streams, BatchNorm buffers, train flags and ``.grad`` restored
afterwards); reading the loop's own pass needs none.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neurothermo._data import Batch
from neurothermo._state import has_train_mode_batchnorm
from neurothermo.monitor import names
from neurothermo.monitor.quantities import batch_noise_terms, squared_norm

if TYPE_CHECKING:
    from neurothermo.monitor.monitor import ThermoMonitor

LOSS, DISC, NOISE, TRACE = names.ENTROPIC
TOTAL = "entropic/total"


def entropic_terms(mon: ThermoMonitor, batch: Batch, loss: Tensor | None,
                   lr: float, wd: float, step_grad_sq: Tensor | None = None) -> dict[str, Tensor]:
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
    replacement = True if mon._replacement is None else mon._replacement
    bn = has_train_mode_batchnorm(mon.model)
    if bn is not None:
        mon._note("noise_bn", f"entropic terms not recorded: BatchNorm {bn!r} is in train mode, which "
                  "couples the samples of a batch, so per-sample gradients and Σ are undefined")
        return {}
    if mon.data is not None:
        try:
            from neurothermo.entropic import entropic_decomposition
        except ImportError as e:
            raise ImportError("ThermoMonitor(data=...) entropic terms need neurothermo.entropic") from e
        with mon._measuring(), torch.enable_grad():
            d = entropic_decomposition(mon.model, mon.loss_fn, mon.data, lr=lr, batch_size=b,
                                       replacement=replacement, weight_decay=wd)
        mon._history.meta["entropic"] = f"exact over data (N={d.n_samples})"
        f64 = torch.float64
        return {LOSS: torch.tensor(d.loss, dtype=f64), DISC: torch.tensor(d.discretization, dtype=f64),
                NOISE: torch.tensor(d.noise, dtype=f64), TOTAL: torch.tensor(d.total, dtype=f64),
                TRACE: torch.tensor(d.trace_sigma, dtype=f64)}
    sizes = None
    if mon._dist is not None:  # every rank takes part in the gathers below, or none does
        sizes = mon._dist.sizes(b, next(iter(mon._params.values())).device)
        if len(set(sizes)) > 1:
            mon._note("noise_sizes", f"entropic terms not recorded at steps whose ranks hold "
                      f"unequal batches ({sizes}): DDP's mean of rank means is then not the global "
                      "batch's gradient; give every rank the same batch size (DistributedSampler)")
            return {}
        b = sum(sizes)
    if b < 2:
        mon._note("noise_b1", "entropic terms need b >= 2 per batch (or data=); not recorded")
        return {}
    try:
        from neurothermo.gradstats import per_sample_grad_norms
    except ImportError as e:
        raise ImportError(
            "ThermoMonitor noise terms need neurothermo.gradstats (per_sample_grad_norms); "
            "pass noise_every=None to monitor without them"
        ) from e
    params = list(mon._params.values())
    grads = [p.grad for p in params]
    grad_sq = step_grad_sq if step_grad_sq is not None else squared_norm([g for g in grads if g is not None])
    decayed = None
    if wd:
        decayed = squared_norm([p.detach() * wd if g is None else g + wd * p.detach()
                                for g, p in zip(grads, params)])
    sample_sq = None
    cap = mon._capture
    if cap is not None and cap.armed:  # read from the caller's own forward and backward
        sample_sq = cap.norms(batch.size)
        if sample_sq is None:
            mon._note("passive", f"entropic terms measured with an extra pass ({cap.reason})")
    if sample_sq is None:
        with mon._measuring(), torch.enable_grad():
            norms = per_sample_grad_norms(mon.model, mon.loss_fn, batch)
        assert isinstance(norms, Tensor)  # by_parameter=False gives one tensor [b]
        sample_sq = norms.detach()
        mon._passive_ready = True  # the model passed the full checks: later steps may capture
    if sizes is not None and mon._dist is not None:  # each rank holds its own samples' norms
        sample_sq = mon._dist.gather(sample_sq, sizes)
    terms = batch_noise_terms(sample_sq, grad_sq, lr=lr, dataset_size=mon._n,
                              replacement=replacement, grad_sq_decayed=decayed)
    mon._history.meta["entropic"] = "unbiased one-minibatch estimate"
    out = {DISC: terms["discretization"], NOISE: terms["noise"], TRACE: terms["trace_sigma"]}
    if loss is not None:
        base = loss.detach()
        if wd:
            base = base + (wd / 2) * squared_norm(params)
        out[LOSS] = base
        out[TOTAL] = base + terms["discretization"] + terms["noise"]
    return out


def make_capture(mon: ThermoMonitor) -> Any:
    """A passive per-sample-norm capture for the noise terms, or None (with a note) if unusable."""
    try:
        from neurothermo.gradstats.passive import BackwardCapture, capturable
    except ImportError:
        return None
    reason = capturable(mon.model, mon._params)
    if reason is not None:
        mon._note("capture", f"entropic terms measured with an extra pass: {reason}")
        return None
    return BackwardCapture(mon.model, mon._params)


def make_sharpness_tracker(mon: ThermoMonitor) -> Any:
    """A :class:`neurothermo.SharpnessTracker` on the monitor's fixed ``data`` (issue 7)."""
    try:
        from neurothermo.curvature import SharpnessTracker
    except ImportError as e:
        raise ImportError(
            "ThermoMonitor(sharpness_every=...) needs neurothermo.curvature (SharpnessTracker)"
        ) from e
    return SharpnessTracker()
