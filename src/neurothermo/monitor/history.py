"""A columnar record of a training run: one sparse series ``step → value`` per named column.

Values may be Python numbers or tensors of any fixed shape (scalars, per-unit vectors, small
matrices). Tensors stay where they were produced (on the model's device) until the history is
*flushed*: then every column's pending values are stacked and copied to host memory in one go, so a
training loop that records tens of values per step pays no device synchronisation per step. Reading
a column, :meth:`History.to_dicts`, :meth:`History.to_jsonl` and :meth:`History.state_dict` flush.

Columns are sparse: a column recorded only every 50 steps (the entropic terms) simply has fewer
entries. Rows (:meth:`to_dicts`) hold, for each recorded step, the columns recorded at that step.
"""
from __future__ import annotations

import bisect
import itertools
import json
import math
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

Value = Tensor | float | int | np.ndarray


def _to_host(t: Tensor) -> np.ndarray:
    """A host numpy copy (half precisions as float32, which numpy can hold)."""
    t = t.cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


class _Column:
    """One column: steps (Python ints) and values, pending tensors plus flushed host chunks."""

    __slots__ = ("chunks", "pending", "shape", "steps")

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.chunks: list[np.ndarray] = []
        self.pending: list[Tensor] = []
        self.shape: tuple[int, ...] | None = None

    def append(self, name: str, value: Value) -> None:
        if isinstance(value, Tensor):
            v = value.detach() if value.requires_grad else value
        else:
            v = torch.as_tensor(np.asarray(value, dtype=np.float64))
        shape = v.shape
        self._check_shape(name, tuple(shape))
        self.pending.append(v)

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(
                f"column {name!r} holds values of shape {self.shape}; got shape {shape}. "
                "Record values of one shape per column (use a new column name otherwise)"
            )

    def extend(self, name: str, steps: list[int], values: Tensor) -> None:
        """Append a block: ``values[i]`` is the entry of ``steps[i]`` (copied to the host now)."""
        v = values.detach()
        self._check_shape(name, tuple(v.shape[1:]))
        self.flush()
        self.chunks.append(_to_host(v))
        self.steps.extend(steps)

    def flush(self) -> None:
        """Stack consecutive pending values of one device and dtype; copy each stack to host once."""
        start = 0
        for i in range(1, len(self.pending) + 1):
            if i == len(self.pending) or (
                (self.pending[i].device, self.pending[i].dtype)
                != (self.pending[start].device, self.pending[start].dtype)
            ):
                self.chunks.append(_to_host(torch.stack(self.pending[start:i])))
                start = i
        self.pending = []

    def values(self) -> np.ndarray:
        self.flush()
        if not self.chunks:
            return np.zeros((0, *(self.shape or ())))
        if len(self.chunks) > 1:
            dtype = np.result_type(*self.chunks)
            self.chunks = [np.concatenate([c.astype(dtype, copy=False) for c in self.chunks])]
        return self.chunks[0]


class History:
    """Columnar table of a run. ``history["loss"]`` → values, ``history.steps("loss")`` → steps.

    ``meta`` is a free-form dict of JSON-serialisable facts about the run (layer names, detected
    symmetries, notes on what was not recorded and why). :func:`train` and :class:`ThermoMonitor`
    fill one; build one yourself to record your own columns.

    Args:
        meta: the initial ``meta`` (copied); None for an empty one.

    Raises:
        TypeError: from :meth:`record`: a non-int step (nothing at construction).
        ValueError: from :meth:`record`: a step that does not increase.
        KeyError: reading a column that was never recorded.

    Example:
        >>> import neurothermo as nt
        >>> h = nt.History({"note": "by hand"})
        >>> for step in range(3):
        ...     h.record(step, loss=1.0 / (step + 1))
        >>> h["loss"].round(3).tolist(), h.steps("loss").tolist()
        ([1.0, 0.5, 0.333], [0, 1, 2])
    """

    def __init__(self, meta: Mapping[str, Any] | None = None) -> None:
        self._cols: dict[str, _Column] = {}
        self.meta: dict[str, Any] = dict(meta or {})
        self._producers: list[weakref.WeakMethod[Callable[[], None]]] = []

    def add_producer(self, bring_up_to_date: Callable[[], None]) -> None:
        """Call ``bring_up_to_date()`` (a bound method, held weakly) before every read.

        A producer that defers work (the monitor derives its columns per block) records what is
        pending through it, so a reader holding this history never sees a partial table.
        """
        self._producers.append(weakref.WeakMethod(bring_up_to_date))

    def _sync(self) -> None:
        for ref in self._producers:
            fn = ref()
            if fn is not None:
                fn()

    # ---- writing -------------------------------------------------------------------------------
    def record(self, step: int, values: Mapping[str, Value] | None = None, **kw: Value) -> None:
        """Append ``values`` (and keyword values) as the entries of ``step`` in their columns.

        Steps of a column must increase strictly; tensors are kept as they are (not copied), so
        pass freshly computed tensors, never a buffer that is later modified in place.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {step!r}")
        items = {**(values or {}), **kw}
        for name, value in items.items():
            col = self._cols.get(name)
            if col is None:
                col = self._cols[name] = _Column()
            if col.steps and step <= col.steps[-1]:
                raise ValueError(
                    f"column {name!r} already has step {col.steps[-1]}; steps must increase "
                    f"(got {step}). Use a fresh History (or truncate(after_step)) to re-record"
                )
            col.append(name, value)
            col.steps.append(step)

    def extend(self, name: str, steps: list[int], values: Tensor) -> None:
        """Record a block of entries of one column at once: ``values[i]`` belongs to ``steps[i]``.

        ``steps`` must increase strictly and follow the column's last step; ``values`` has one row
        per step (a tensor, copied to host memory now: a block is recorded at flush time).
        """
        if len(steps) != values.shape[0]:
            raise ValueError(f"column {name!r}: {len(steps)} steps but {values.shape[0]} rows of values")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"column {name!r}: steps of a block must increase strictly, got {steps}")
        col = self._cols.get(name)
        if col is None:
            col = self._cols[name] = _Column()
        if col.steps and steps and steps[0] <= col.steps[-1]:
            raise ValueError(
                f"column {name!r} already has step {col.steps[-1]}; steps must increase "
                f"(got {steps[0]}). Use a fresh History (or truncate(after_step)) to re-record"
            )
        col.extend(name, list(steps), values)

    def flush(self) -> None:
        """Move every pending tensor to host memory (one stack and copy per column)."""
        self._sync()
        for col in self._cols.values():
            col.flush()

    def truncate(self, after_step: int) -> None:
        """Drop every entry with ``step > after_step`` (used when resuming from a checkpoint)."""
        self._sync()
        for name in list(self._cols):
            col = self._cols[name]
            keep = sum(1 for s in col.steps if s <= after_step)
            vals = col.values()[:keep]
            col.steps = col.steps[:keep]
            col.chunks = [vals] if keep else []
            if not keep:
                del self._cols[name]

    # ---- reading -------------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        """Column names in the order they were first recorded."""
        self._sync()
        return list(self._cols)

    def __contains__(self, name: object) -> bool:
        self._sync()
        return name in self._cols

    def __getitem__(self, name: str) -> np.ndarray:
        """Values of column ``name`` stacked along a new first axis (one entry per step)."""
        return self._column(name).values()

    def steps(self, name: str) -> np.ndarray:
        """The steps at which column ``name`` was recorded (int64 array)."""
        return np.asarray(self._column(name).steps, dtype=np.int64)

    def last(self, name: str) -> np.ndarray | np.generic:
        """The most recent value of column ``name`` (a numpy scalar for a scalar column)."""
        vals = self[name]
        if len(vals) == 0:
            raise KeyError(f"column {name!r} is empty")
        last: np.ndarray | np.generic = vals[-1]
        return last

    def __len__(self) -> int:
        """Number of distinct recorded steps."""
        self._sync()
        return len({s for col in self._cols.values() for s in col.steps})

    def _column(self, name: str) -> _Column:
        self._sync()
        try:
            return self._cols[name]
        except KeyError:
            raise KeyError(
                f"no column {name!r} in this history; columns: {self.columns[:30]}"
            ) from None

    def to_dicts(self, *, after_step: int | None = None) -> list[dict[str, Any]]:
        """One dict per recorded step, ``{"step": s, column: value, ...}`` (pandas-free rows).

        Scalars become Python floats, arrays nested lists. ``after_step`` keeps steps ``> after_step``.
        """
        self._sync()
        rows: dict[int, dict[str, Any]] = {}
        for name, col in self._cols.items():
            vals = col.values()
            start = 0 if after_step is None else bisect.bisect_right(col.steps, after_step)
            for s, v in zip(col.steps[start:], vals[start:]):
                rows.setdefault(s, {"step": s})[name] = v.tolist() if v.ndim else float(v)
        return [rows[s] for s in sorted(rows)]

    # ---- JSONL ---------------------------------------------------------------------------------
    def to_jsonl(self, path: str | Path, *, include_meta: bool = True) -> Path:
        """Write the rows as JSON lines; the first line is ``{"__meta__": meta}`` if asked.

        JSON has no NaN/Inf: non-finite floats are written as the strings ``"nan"``, ``"inf"``,
        ``"-inf"`` and read back as floats by :meth:`from_jsonl`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            if include_meta and self.meta:
                f.write(dumps_row({"__meta__": self.meta}) + "\n")
            for row in self.to_dicts():
                f.write(dumps_row(row) + "\n")
        return path

    @classmethod
    def from_jsonl(cls, path: str | Path) -> History:
        """Read a history written by :meth:`to_jsonl` or a JSONL writer."""
        hist = cls()
        with Path(path).open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
                if "__meta__" in row:
                    hist.meta.update(row["__meta__"])
                    continue
                if "step" not in row:
                    raise ValueError(f"{path}:{lineno}: row has no 'step' field")
                step = int(row.pop("step"))
                hist.record(step, {k: np.asarray(_decode_value(v), dtype=np.float64)
                                   for k, v in row.items()})
        return hist

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only, so that ``torch.load(weights_only=True)`` reads it back."""
        self._sync()
        cols = {
            name: {"steps": torch.as_tensor(col.steps, dtype=torch.int64),
                   "values": torch.from_numpy(np.ascontiguousarray(col.values()))}
            for name, col in self._cols.items()
        }
        return {"columns": cols, "meta": json.loads(json.dumps(self.meta))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._cols = {}
        for name, c in state["columns"].items():
            col = _Column()
            col.steps = [int(s) for s in c["steps"].tolist()]
            vals = c["values"].numpy()
            col.shape = tuple(vals.shape[1:])
            col.chunks = [vals] if len(col.steps) else []
            self._cols[name] = col
        self.meta = dict(state.get("meta", {}))

    def __repr__(self) -> str:
        return f"History({len(self)} steps, {len(self._cols)} columns)"


def _encode(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    return v


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _decode_value(v: Any) -> Any:
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if isinstance(v, list):
        return [_decode_value(x) for x in v]
    return v


def dumps_row(row: Mapping[str, Any]) -> str:
    """One JSON line for a row, with non-finite floats encoded as strings (strict JSON)."""
    return json.dumps(_encode(dict(row)), allow_nan=False, separators=(",", ":"))
