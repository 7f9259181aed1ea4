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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from neurothermo.monitor import names

_DETECT_SAMPLES = 8  # find_symmetries only needs a few inputs to trace and verify the model


def detect(model: nn.Module, inputs: Any, request: str | Sequence[Any] | None) -> list[Any]:
    """Resolve ``symmetries=`` of the monitor: "auto" → find_symmetries, None → [], a list → it."""
    if request is None:
        return []
    if request != "auto":
        return list(request)
    try:
        from neurothermo.symmetry import find_symmetries
    except ImportError as e:
        raise ImportError(
            "ThermoMonitor(symmetries='auto') needs neurothermo.symmetry (find_symmetries); "
            "pass symmetries=None to monitor without charges and neuron energies"
        ) from e
    if isinstance(inputs, Mapping):  # keyword inputs (a dict, a BatchEncoding): not traceable
        from neurothermo.symmetry import UntraceableModelError

        raise UntraceableModelError(
            "symmetries='auto' traces forward(inputs) with positional tensor inputs, but the batch "
            f"holds a mapping of inputs (keys {list(inputs)}); pass symmetries=None, or a list "
            "of Symmetry objects found with find_symmetries on a positional wrapper of the model")
    return list(find_symmetries(model, inputs[:_DETECT_SAMPLES]))


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
        return {"kind": str(self.sym.kind), "location": str(self.sym.location),
                "units": int(self.sym.n_units), "per_unit": self.per_unit}


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
