"""Which recorded layer inputs carry the batch axis: a one-sample probe of the model's layout.

Every per-sample rule reads dim 0 of a layer's input as the sample axis, and checks that its size is
the batch size ``b``. That check cannot tell a batch axis from another axis whose size is ``b`` by
coincidence. The case is real: T5 calls its ``relative_attention_bias`` embedding on a
``[q_len, k_len]`` tensor of position buckets that has no batch axis at all (its output is shared by
every sample); when ``q_len = b``, the embedding's rule would read the query positions as samples
and return wrong per-sample norms with no error.

The probe settles it the only general way: run the model once more on a sub-batch of ``b'`` samples
(``b' = 1``, or 2 if the model refuses one sample) and log, for every call of every module with
parameters, the leading size of each tensor input. An input whose leading size is ``b`` in the
measured pass but not ``b'`` in the probe does not follow the batch: it is *batch-less*. Rules that
read it as batch-first then refuse it (:func:`~neurothermo.gradstats.rules._base.batch_first`, within
:func:`~neurothermo.gradstats.rules._base.judged`,
naming the module and the way out), and the torch.func fallback holds it constant instead of
mapping over it.

Calls are matched by module name and call order; a call the probe does not match is not judged.
The probe runs with gradients enabled, so modules take the same code path as in the measured pass
(``nn.MultiheadAttention``'s fast path runs only without gradients), and with the random-number
state forked, so it draws nothing from the caller's stream. Its log depends on the model and the
shapes of the inputs (all but the batch axis), not on ``b``: it is cached per model and shape
signature, so a training loop or a DataLoader pays for it once. A model with sharded parameters
(FSDP2, tensor parallel) is not probed: its forward is collective, and an extra forward run by the
ranks whose cache missed would hang the others; it gets one :class:`LayoutWarning`, as does a
model whose forward refuses every sub-batch.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Batch
from neurothermo.gradstats._capture import input_leaves
from neurothermo.gradstats.rules.fallback import tensor_leaves

# leading sizes (None for a scalar) of the tensor inputs of each module call, by (name, k-th call)
Log = dict[tuple[str, int], tuple[int | None, ...]]
Leaf = tuple[str, int, int]  # (module name, k-th call, j-th tensor input)


@dataclass
class Probe:
    """One probe's result: ``size`` = b', ``log`` the leading sizes. ``values``: the probe's copy
    of each input whose leading size is a multiple ``m·b'`` (``m > 1``) — a batch folded with
    another axis, or an input without one — kept until the first pass judged against it decided
    ``folded[leaf]`` (``m``, or 0: not a sample-major fold), which later passes reuse."""

    size: int
    log: Log
    shapes: dict[tuple[str, int], tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    out_log: dict[tuple[str, int], tuple[int, ...] | None] = field(default_factory=dict)
    values: dict[Leaf, Tensor] = field(default_factory=dict)
    folded: dict[Leaf, int] = field(default_factory=dict)


@dataclass
class Judgement:
    """``batchless``: ``{id: (tensor, b', probe size)}``; ``folded``: ``{id: (tensor, m)}``."""

    batchless: dict[int, tuple[Tensor, int, int]] = field(default_factory=dict)
    folded: dict[int, tuple[Tensor, int]] = field(default_factory=dict)
    axes: dict[int, int] = field(default_factory=dict)  # batch-less inputs' sample axis, if any

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, Probe | None]] = (
    weakref.WeakKeyDictionary())
_CACHE_SIZE = 16  # shape signatures kept per model (a DataLoader has one or two)
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class LayoutWarning(UserWarning):
    """The layout probe could not run; inputs whose size equals the batch size are not judged."""


def _signature(batch: Batch, model: nn.Module) -> Any:
    def sig(v: Any) -> Any:
        if isinstance(v, Tensor):
            return ("T", tuple(v.shape[1:]), v.dtype, v.device)
        if v is None or isinstance(v, bool | int | float | str):
            return v
        return type(v).__name__

    ins = batch.inputs
    parts = (sig(ins) if isinstance(ins, Tensor)
             else tuple(sorted((k, sig(v)) for k, v in ins.items())))
    flags = tuple(m.training for m in model.modules())
    return parts, sig(batch.targets), flags, torch.is_grad_enabled()


def probe_log(model: nn.Module, batch: Batch) -> Probe | None:
    """The leading sizes of every module call's tensor inputs on ``b'`` samples (a :class:`Probe`).

    Cached per model and shape signature. None (after one :class:`LayoutWarning` per model) when
    the model's forward fails on every sub-batch tried; the caller then judges nothing.
    """
    key = _signature(batch, model)
    per_model = _CACHE.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    if _sharded(model):
        # FSDP / tensor parallel: a forward gathers parameters across ranks, so an extra one that
        # only some ranks run (their cache missed) would hang the others
        _warn_once(model, "the model's parameters are sharded (DTensor: FSDP2 or tensor "
                   "parallel), and the layout probe's extra forward would need every rank to join")
        return None
    found: Probe | None = None
    errors = []
    for size in (1, 2):
        if size >= batch.size:
            break
        try:
            found = _run(model, batch[:size], size)
            break
        except Exception as e:  # the model refuses this sub-batch: try the next size
            errors.append(f"{size} sample{'s' * (size > 1)}: {type(e).__name__}: {e}")
    if found is None and errors:
        _warn_once(model, "the layout probe (one forward on a sub-batch, to see which layer "
                   "inputs follow the batch) failed (" + "; ".join(errors)[:400] + ")")
    if len(per_model) >= _CACHE_SIZE:
        per_model.pop(next(iter(per_model)))
    per_model[key] = found
    return found


def _warn_once(model: nn.Module, why: str) -> None:
    if model in _WARNED:
        return
    _WARNED.add(model)
    warnings.warn(
        f"per-sample gradients: {why}. Layer inputs with no batch axis whose first size equals "
        "the batch size cannot be detected for this model; use batches whose size differs from "
        "every other input size (sequence length, image size) to be safe.",
        LayoutWarning, stacklevel=5,
    )


def _sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _run(model: nn.Module, sub: Batch, size: int) -> Probe:
    probe = Probe(size, {})
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            k = counts.get(name, 0)
            counts[name] = k + 1
            leaves = input_leaves(args, kwargs)
            probe.log[(name, k)] = tuple(int(t.shape[0]) if t.dim() else None for t in leaves)
            probe.shapes[(name, k)] = tuple(tuple(t.shape) for t in leaves)
            first = output if isinstance(output, Tensor) else next(
                iter(tensor_leaves(output)), None)
            probe.out_log[(name, k)] = (tuple(first.shape) if isinstance(first, Tensor)
                                        and first.dim() else None)
            for j, t in enumerate(leaves):
                if t.dim() and t.shape[0] > size and t.shape[0] % size == 0:
                    probe.values[(name, k, j)] = t.detach().clone()
        return record

    devices = [sub.tensors()[0].device] if sub.tensors() else []
    cuda = [d for d in devices if d.type == "cuda"]
    try:
        for name, module in model.named_modules():
            if next(module.parameters(recurse=False), None) is None:
                continue
            handles.append(module.register_forward_hook(hook(name or type(module).__name__),
                                                        with_kwargs=True))
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            sub.outputs(model)
    finally:
        for h in handles:
            h.remove()
    return probe


def judge(calls: list[tuple[str, list[Tensor]]], b: int, probe: Probe | None) -> Judgement:
    """Which recorded inputs do not follow the batch, and which fold it with another axis.

    ``calls``: ``(module name, tensor inputs)`` of every recorded call, in order. An input of
    leading size ``b`` whose probe size is not ``b'`` is *batch-less*. An input of leading size
    ``m·b`` whose probe size is ``m·b'`` (``m > 1``: Swin's windows, ``[b·n_windows, …]``) is
    *folded* when it is sample-major, i.e. its first ``m·b'`` rows equal the probe's (the probe
    ran on the first ``b'`` samples): then sample ``i`` owns rows ``[i·m, (i+1)·m)``. The order
    is a property of the code, so it is decided once, on the pass the probe ran with, and reused.
    The tensors are kept in the result so their ids stay their own while it is in use.
    """
    out = Judgement()
    if probe is None or b <= 1:
        return out
    size = probe.size
    counts: dict[str, int] = {}
    for name, leaves in calls:
        k = counts.get(name, 0)
        counts[name] = k + 1
        seen = probe.log.get((name, k))
        if seen is None or len(seen) != len(leaves):
            continue  # the probe took another path here: not judged
        for j, (t, lead) in enumerate(zip(leaves, seen)):
            if not t.dim() or lead is None:
                continue
            if t.shape[0] == b and lead != size:
                out.batchless[id(t)] = (t, size, lead)
                shapes = probe.shapes.get((name, k))
                axis = _sample_axis(t, shapes[j], b, size) if shapes else None
                if axis is not None:
                    out.axes[id(t)] = axis
            elif lead > size and lead % size == 0 and t.shape[0] == (lead // size) * b:
                m = _fold(probe, (name, k, j), t, lead // size)
                if m:
                    out.folded[id(t)] = (t, m)
    probe.values.clear()  # every fold seen is decided; the copies are not needed again
    return out


def _sample_axis(t: Tensor, small: tuple[int, ...], b: int, size: int) -> int | None:
    """The axis of ``t`` that is ``b`` here and ``b'`` in the probe, every other axis the same
    (the samples on another axis than 0: a time-major layout), or None."""
    if len(small) != t.dim():
        return None
    found = [d for d in range(1, t.dim()) if t.shape[d] == b and small[d] == size
             and all(small[k] == t.shape[k] for k in range(t.dim()) if k != d)]
    return found[0] if len(found) == 1 else None


def _fold(probe: Probe, leaf: Leaf, t: Tensor, m: int) -> int:
    if leaf not in probe.folded:
        ref = probe.values.get(leaf)
        if ref is None:
            return 0  # not seen on the pass the probe ran with: not judged
        mine = t.detach()[:ref.shape[0]]
        ok = mine.shape == ref.shape and bool(torch.allclose(
            mine.to(ref.dtype), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-30)
            if ref.is_floating_point() else torch.equal(mine, ref))
        probe.folded[leaf] = m if ok else 0
    return probe.folded[leaf]
