"""The monitor's view of detected symmetries: which charges to track and how to compute them fast.

Symmetries come from :func:`neurothermo.find_symmetries` (issue 5). Isometries (permutations, sign
flips) carry no charge and are skipped. For every other symmetry the monitor records the charge
``sym.charge(params)``. For symmetries with hidden units (``rescale``, and ``double_rotation``, whose
GL(d) contains the per-unit rescaling) it also records the per-unit incoming and outgoing gradient
energies (:meth:`~neurothermo.monitor.quantities.SquareSums.unit_energies`; for a double rotation the diagonal
of ``Σ_in g gᵀ`` and ``Σ_out g gᵀ``): the neuron-balance data. For ``rescale`` their difference is
the whole imbalance ``gᵀAg`` (no second pass); other kinds use ``sym.imbalance(grads)``.

A charge computed after an optimizer step is remembered together with the parameters' in-place
version counters, and reused as the next step's "before" charge when no parameter has changed
since, so a tracked charge costs one evaluation per step, not two.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from neurothermo.monitor import names

_DETECT_SAMPLES = 8  # find_symmetries only needs a few inputs to trace and verify the model


def _say(line: str) -> None:
    print(f"ThermoMonitor: {line}", file=sys.stderr, flush=True)


def _first(inputs: Any, k: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[:k]
    if isinstance(inputs, Mapping):
        return {n: v[:k] if isinstance(v, Tensor) and v.ndim else v for n, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return tuple(x[:k] if isinstance(x, Tensor) and x.ndim else x for x in inputs)
    return inputs


def detect(
    model: nn.Module, inputs: Any, request: str | Sequence[Any] | None,
    note: Callable[[str], None] | None = None, say: Callable[[str], None] = _say,
) -> list[Any]:
    """Resolve ``symmetries=`` of the monitor: "auto" → find_symmetries, None → [], a list → it.

    With "auto", a model whose graph cannot be captured at all gives ``note(reason)`` (the
    monitor turns it into a ``MonitorWarning``) and no symmetries; parts that stay opaque are
    noted too and the rest is monitored. Detection that takes over a second says so through
    ``say`` (stderr), stage by stage.
    """
    if request is None:
        return []
    if request != "auto":
        return list(request)
    try:
        from neurothermo.symmetry import UntraceableModelError, find_symmetries
    except ImportError as e:
        raise ImportError(
            "ThermoMonitor(symmetries='auto') needs neurothermo.symmetry (find_symmetries); "
            "pass symmetries=None to monitor without charges and neuron energies"
        ) from e
    try:
        report = find_symmetries(model, _first(inputs, _DETECT_SAMPLES), explain=True,
                                 progress=lambda line: say(f"detecting symmetries: {line}"))
    except UntraceableModelError as err:
        if note is not None:
            note(f"no symmetry columns: find_symmetries could not capture the model ({err}); "
                 "pass symmetries=[...] (e.g. found with leaf_modules=) or symmetries=None")
        return []
    if report.opaque and note is not None:
        parts = ", ".join(f"'{b.path}'" for b in report.opaque)
        note(f"symmetries of {parts} not searched (opaque to graph capture); the rest is monitored")
    return list(report.symmetries)


def versions(params: Mapping[str, Tensor]) -> tuple[int, ...]:
    return tuple(p._version for p in params.values())


@dataclass(eq=False)
class Tracked:
    """One charge-carrying symmetry being monitored (mutable per-step state)."""

    index: int
    sym: Any
    per_unit: bool  # record incoming / outgoing energies per unit
    before: Tensor | None = None
    predicted: Tensor | None = None
    ema_in: Tensor | None = None
    ema_out: Tensor | None = None
    deferred: bool | None = None  # charge derived from the shared sums (derive.deferred_charge)
    _cache: tuple[tuple[int, ...], Tensor] | None = field(default=None, repr=False)
    cols: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        i = self.index
        self.cols = {"in": names.energy_in(i), "out": names.energy_out(i),
                     "ratio": names.neuron_ratio(i), "residual": names.neuron_residual(i),
                     "charge": names.charge(i), "pred": names.charge_pred(i),
                     "meas": names.charge_meas(i), "err": names.charge_err(i)}

    def cached_charge(self, params: Mapping[str, Tensor]) -> Tensor | None:
        """The charge remembered after the last step, if no parameter changed in place since."""
        if self._cache is not None and self._cache[0] == versions(params):
            return self._cache[1]
        return None

    def remember(self, charge: Tensor, params: Mapping[str, Tensor]) -> None:
        self._cache = (versions(params), charge)

    def forget(self) -> None:
        self._cache = None

    def describe(self) -> dict[str, Any]:
        out = {"kind": str(self.sym.kind), "location": str(self.sym.location),
               "units": int(self.sym.n_units), "per_unit": self.per_unit,
               "params": [str(n) for n in self.sym.param_names]}
        if not getattr(self.sym, "exact", True):  # approximate: the breaking is part of the record
            out |= {"exact": False, "breaking": float(self.sym.breaking),
                    "broken_by": str(self.sym.broken_by)}
        return out


def track(syms: Sequence[Any], params: Mapping[str, Tensor]) -> list[Tracked]:
    """Tracked entries for the charge-carrying symmetries, numbered in the given order."""
    out: list[Tracked] = []
    for s in syms:
        if s.isometry:
            continue
        missing = [n for n in s.param_names if n not in params]
        if missing:
            raise ValueError(f"symmetry {s} acts on {missing}, which are not trainable parameters")
        per_unit = s.kind in ("rescale", "double_rotation") and not s.whole
        out.append(Tracked(index=len(out), sym=s, per_unit=per_unit))
    return out
