"""Grids of a sweep: ``key=spec`` axes parsed and checked against an experiment's settings.

An axis is ``key=v1,v2,...`` (listed values), ``key=a:b:n`` (``n`` evenly spaced values from ``a``
to ``b``, both included) or ``key=a:b:n:log`` (``n`` geometrically spaced values, ``a, b > 0``).
The grid is the Cartesian product of its axes; each grid point runs once per seed. Every cell's
settings are built and range-checked here, so a bad grid fails before anything runs, with an
error naming the key.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from neurothermo.config import ConfigError, _parse, _type_name, apply_overrides, validate_config
from neurothermo.runner import check_seed


@dataclass(frozen=True)
class Axis:
    """One grid axis: a setting and its values (typed, in the order given)."""

    key: str
    values: tuple[Any, ...]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, int | float) and not isinstance(v, bool) for v in self.values)


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a grid point (``key -> value``) and a seed."""

    point: tuple[tuple[str, Any], ...]
    seed: int

    def overrides(self, base: Sequence[str] = ()) -> list[str]:
        """``key=value`` overrides of this cell, after the sweep's base overrides."""
        return [*base, *(f"{k}={format_value(v)}" for k, v in self.point)]


def format_value(value: Any) -> str:
    """The override text of a typed value; floats use ``repr`` so they read back exactly."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _tidy(x: float) -> float:
    """Round a computed grid coordinate to 12 significant digits (0.15000000000000002 → 0.15)."""
    return float(f"{x:.12g}")


def _spaced(key: str, raw: str, tp: Any) -> list[Any]:
    parts = raw.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3].strip() != "log"):
        raise ConfigError(f"grid {key!r}: range {raw!r} is not of the form start:stop:count "
                          "or start:stop:count:log")
    try:
        start, stop = float(parts[0]), float(parts[1])
        count = int(parts[2])
    except ValueError:
        raise ConfigError(f"grid {key!r}: cannot read range {raw!r} (start and stop are numbers, "
                          "count an integer)") from None
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise ConfigError(f"grid {key!r}: range {raw!r} must have finite ends")
    if count < 1:
        raise ConfigError(f"grid {key!r}: range {raw!r} is empty (count must be >= 1)")
    log = len(parts) == 4
    if log and not (start > 0 and stop > 0):
        raise ConfigError(f"grid {key!r}: a log range needs start and stop > 0, got {raw!r}")
    if count == 1:
        xs = [start]
    elif log:
        a, b = math.log(start), math.log(stop)
        xs = [math.exp(a + (b - a) * i / (count - 1)) for i in range(count)]
    else:
        xs = [start + (stop - start) * i / (count - 1) for i in range(count)]
    xs = [_tidy(x) for x in xs]
    if tp is int:
        if any(abs(x - round(x)) > 1e-9 * max(1.0, abs(x)) for x in xs):
            raise ConfigError(f"grid {key!r}: range {raw!r} gives non-integer values for an "
                              "integer setting; choose start, stop and count so the step is whole")
        return [round(x) for x in xs]
    if tp is not float:
        raise ConfigError(f"grid {key!r}: a start:stop:count range needs a numeric setting; "
                          f"{key!r} is {_type_name(tp)}: list its values instead (key=a,b)")
    return xs


def parse_axis(spec: str, config: type) -> Axis:
    """Parse one ``key=spec`` axis against the settings class ``config``.

    Raises:
        ConfigError: not ``key=...``, an unknown key, a list-valued setting, an unreadable or
            empty value list or range, or a value repeated.
    """
    if "=" not in spec:
        raise ConfigError(f"grid {spec!r} is not of the form key=values (e.g. lr=0.1,0.2 or "
                          "p=0.05:0.4:8)")
    key, raw = (s.strip() for s in spec.split("=", 1))
    key = key.replace("-", "_")
    hints = typing.get_type_hints(config)
    names = [f.name for f in dataclasses.fields(config)]
    if key not in names:
        raise ConfigError(f"grid: unknown setting {key!r}; valid keys: {', '.join(names)}")
    tp = hints[key]
    if typing.get_origin(tp) is tuple:
        raise ConfigError(f"grid {key!r}: a list-valued setting cannot be a grid axis; set it "
                          "with --set and sweep a scalar setting")
    if not raw:
        raise ConfigError(f"grid {key!r}: no values given")
    if ":" in raw and "," not in raw:
        values = _spaced(key, raw, tp)
    else:
        items = [p.strip() for p in raw.split(",")]
        if any(not p for p in items):
            raise ConfigError(f"grid {key!r}: empty value in {raw!r}")
        values = [_parse(key, p, tp) for p in items]
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"grid {key!r}: a value is repeated in {raw!r}")
    return Axis(key, tuple(values))


@dataclass(frozen=True)
class Grid:
    """The axes and seeds of a sweep, with the base overrides every cell shares."""

    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    base: tuple[str, ...] = ()

    @property
    def points(self) -> list[tuple[tuple[str, Any], ...]]:
        keys = [a.key for a in self.axes]
        return [tuple(zip(keys, combo, strict=True))
                for combo in itertools.product(*(a.values for a in self.axes))]

    @property
    def cells(self) -> list[Cell]:
        return [Cell(p, s) for p in self.points for s in self.seeds]

    def describe(self) -> dict[str, Any]:
        """JSON-ready description; two sweeps with equal descriptions are the same sweep."""
        return {"grid": {a.key: list(a.values) for a in self.axes}, "seeds": list(self.seeds),
                "overrides": list(self.base)}


def build_grid(config: type, preset: Any, specs: Iterable[str], seeds: int, *, first_seed: int = 0,
               base: Sequence[str] = ()) -> Grid:
    """Parse the axes, and check every cell's settings, before anything runs.

    Args:
        config: the experiment's settings class; preset: the preset the cells start from.
        specs: ``key=spec`` axes; seeds: seeds per grid point (``first_seed, first_seed + 1, …``).
        base: ``key=value`` overrides shared by every cell (``--set``); a key may not be both.

    Raises:
        ConfigError: a bad axis (see :func:`parse_axis`), a key given twice, or a cell whose
            settings are out of range (the error names the key and value).
        ValueError: seeds < 1 or a seed out of range.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    check_seed(first_seed)
    check_seed(first_seed + seeds - 1)
    axes: list[Axis] = []
    for spec in specs:
        axis = parse_axis(spec, config)
        if any(a.key == axis.key for a in axes):
            raise ConfigError(f"grid {axis.key!r} is given twice; give each key once with all "
                              "its values")
        axes.append(axis)
    base_keys = {b.split("=", 1)[0].strip().replace("-", "_") for b in base}
    for a in axes:
        if a.key in base_keys:
            raise ConfigError(f"setting {a.key!r} is both a grid axis and a --set override; "
                              "give it once")
    grid = Grid(tuple(axes), tuple(range(first_seed, first_seed + seeds)), tuple(base))
    start = validate_config(preset)
    for point in grid.points:
        apply_overrides(start, Cell(point, first_seed).overrides(base))
    return grid
