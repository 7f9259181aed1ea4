"""Sweeps: a grid over an experiment's settings and seeds, each cell an ordinary run, on dask.

``run_sweep`` builds and checks the grid (every cell's settings) before anything runs, then finds
or creates the sweep folder ``OUT/sweeps/<name>-<stamp>/`` and runs each cell into its run store
``cells/`` through :func:`neurothermo.runner.run_experiment`. Cells run as tasks on
``dask.distributed`` (a ``LocalCluster`` of ``workers`` single-threaded processes, or the cluster
at ``scheduler``), or one after another in this process with ``workers=0``. The driver alone
writes ``index.json`` (atomically, after every cell), so a killed driver loses no finished cell:
a finished cell is a run folder with status ``done``, and running the same sweep again keeps it
(:func:`neurothermo.runner.find_finished`) and reruns failed, interrupted or killed cells. A
worker that dies has its tasks rescheduled by dask on the other workers. At the end the cells are
aggregated over seeds (:mod:`neurothermo.sweep_table`): ``table.csv``, ``aggregate.json`` and heat
maps. This module is the edge: nothing in the core imports it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurothermo.experiments.base import MissingExtra, get_experiment
from neurothermo.runner import find_finished
from neurothermo.runstore import atomic_write_json, check_writable
from neurothermo.sweep_grid import Cell, Grid, build_grid
from neurothermo.sweep_table import aggregate, heatmaps, read_summary_json, write_csv


class SweepError(ValueError):
    """A sweep that cannot start: no grid declared or given, or dask missing."""


def run_cell(name: str, quick: bool, seed: int, root: str, overrides: list[str]) -> dict[str, Any]:
    """Run one cell into the run store ``root`` with one torch thread; never raises for a failed
    experiment (the result says ``failed`` with the reason). What a dask task executes."""
    import torch

    from neurothermo.runner import ExperimentFailed, run_experiment

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_experiment(name, quick=quick, seed=seed, out=root, overrides=overrides)
        return {"status": "done", "path": str(result.path)}
    except ExperimentFailed as exc:
        return {"status": "failed", "path": str(exc.run_dir), "reason": exc.reason}
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class SweepResult:
    """The sweep folder, its index entries and the aggregated rows (one per grid point)."""

    path: Path
    cells: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    keys: list[str]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.cells if c["status"] != "done"]


def resolve_grid(name: str, grid: Sequence[str] | None, seeds: int | None, quick: bool,
                 first_seed: int = 0, base: Sequence[str] = ()) -> Grid:
    """The grid to run: the axes and seeds given, or else the experiment's declared sweep.

    Raises:
        UnknownExperiment, MissingExtra: as :func:`neurothermo.runner.run_experiment`.
        SweepError: neither given nor declared.
        ConfigError, ValueError: a bad axis, seed count or cell setting (naming the key).
    """
    exp = get_experiment(name)
    missing = exp.missing()
    if missing:
        extra = exp.install or (f'pip install -e ".[{exp.extra}]"' if exp.extra else "install them")
        raise MissingExtra(f"experiment {name!r} needs {', '.join(missing)}, which is not "
                           f"installed; {extra}")
    if not grid and seeds is None:
        if exp.sweep is None:
            raise SweepError(f"experiment {name!r} declares no sweep; give --grid KEY=VALUES "
                             "and/or --seeds N")
        specs, n = exp.sweep.for_preset(quick)
    else:
        specs, n = tuple(grid or ()), 1 if seeds is None else seeds
    return build_grid(exp.config, exp.preset(quick), specs, n, first_seed=first_seed, base=base)


def _spec(name: str, quick: bool, grid: Grid) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(json.dumps(
        {"experiment": name, "preset": "quick" if quick else "full", **grid.describe()}))
    return spec


def _folder(out: Path, name: str, spec: dict[str, Any], fresh: bool) -> Path:
    """The newest sweep folder of the same sweep under ``out/sweeps`` (unless ``fresh``), or a new one."""
    root = out / "sweeps"
    if not fresh and root.is_dir():
        for d in sorted((p for p in root.glob(f"{name}-*") if p.is_dir()), reverse=True):
            try:
                if json.loads((d / "index.json").read_text()).get("spec") == spec:
                    return d
            except (OSError, ValueError):
                continue
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / f"{name}-{stamp}"
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            path = root / f"{name}-{stamp}-{secrets.token_hex(2)}"


def _entry(cell: Cell, base: Sequence[str]) -> dict[str, Any]:
    return {"point": dict(cell.point), "seed": cell.seed, "overrides": cell.overrides(base),
            "status": "pending", "path": None}


def run_sweep(
    name: str,
    *,
    grid: Sequence[str] | None = None,
    seeds: int | None = None,
    first_seed: int = 0,
    quick: bool = False,
    base: Sequence[str] = (),
    out: Path | str = "runs",
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    rerun: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Run (or resume) a sweep of experiment ``name`` and aggregate it.

    Args:
        grid: ``key=spec`` axes (see :mod:`neurothermo.sweep_grid`); with ``seeds`` None too, the
            experiment's declared ``sweep`` is used. seeds: seeds per grid point, from ``first_seed``.
        base: ``key=value`` overrides shared by every cell.
        workers: size of the LocalCluster (default: the CPU count, at most the cells to run);
            ``0`` runs the cells one after another in this process, without dask.
        scheduler: address of a running dask scheduler (``tcp://host:8786``); the workers must
            see ``out`` (a shared file system). client: an existing ``dask.distributed.Client``.
        rerun: start a fresh sweep folder instead of resuming the newest one of the same sweep.
        on_cell: called with each cell's index entry when it finishes (or is kept).

    Raises:
        as :func:`resolve_grid`, and RunStoreError for an unwritable ``out``, all before any cell.
    """
    g = resolve_grid(name, grid, seeds, quick, first_seed, base)
    out = check_writable(Path(out))
    spec = _spec(name, quick, g)
    folder = _folder(out, name, spec, rerun)
    cells_root = (folder / "cells").resolve()  # absolute: workers may run in another folder
    entries = [_entry(c, g.base) for c in g.cells]
    index: dict[str, Any] = {"spec": spec, "created": _dt.datetime.now(_dt.timezone.utc)
                             .isoformat(timespec="seconds"), "complete": False, "cells": entries}

    def save() -> None:
        atomic_write_json(folder / "index.json", index)

    def finish(i: int, res: dict[str, Any]) -> None:
        entries[i].update(status=res["status"], path=os.path.relpath(res["path"], folder)
                          if res.get("path") else None)
        if "reason" in res:
            entries[i]["reason"] = res["reason"]
        save()
        if on_cell is not None:
            on_cell(entries[i])

    todo = []
    for i, (cell, e) in enumerate(zip(g.cells, entries, strict=True)):
        done = find_finished(name, quick=quick, seed=cell.seed, out=cells_root,
                             overrides=e["overrides"])
        if done is not None:
            e.update(status="done", path=os.path.relpath(done, folder), kept=True)
        else:
            todo.append(i)
    save()
    for i in range(len(entries)):
        if i not in todo and on_cell is not None:
            on_cell(entries[i])
    if todo and workers == 0 and client is None and scheduler is None:
        for i in todo:
            e = entries[i]
            finish(i, run_cell(name, quick, e["seed"], str(cells_root), e["overrides"]))
    elif todo:
        _run_dask(name, quick, cells_root, entries, todo, finish, workers, scheduler, client)
    rows = aggregate([dict(c.point) for c in [Cell(p, 0) for p in g.points]],
                     [[s for e in entries if e["status"] == "done" and e["point"] == dict(p)
                       and (s := read_summary_json(folder / e["path"])) is not None]
                      for p in g.points])
    keys = [a.key for a in g.axes]
    write_csv(folder / "table.csv", keys, rows)
    atomic_write_json(folder / "aggregate.json", rows)
    index["heatmaps"] = heatmaps(folder, [(a.key, a.values) for a in g.axes], rows,
                                 f"{name} ({'quick' if quick else 'full'}), {len(g.seeds)} seed(s)")
    index["complete"] = all(e["status"] == "done" for e in entries)
    save()
    return SweepResult(folder, entries, rows, keys)


def _run_dask(name: str, quick: bool, cells_root: Path, entries: list[dict[str, Any]],
              todo: list[int], finish: Callable[[int, dict[str, Any]], None],
              workers: int | None, scheduler: str | None, client: Any) -> None:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise SweepError('dask.distributed is not installed; pip install -e ".[dist]", or run '
                         "the cells in this process with --workers 0") from None
    own: list[Any] = []
    # dask.distributed's Client, LocalCluster and as_completed carry no annotations
    try:
        if client is None:
            if scheduler:
                client = Client(scheduler)  # type: ignore[no-untyped-call]
            else:
                n = workers if workers is not None else min(os.cpu_count() or 1, len(todo))
                cluster = LocalCluster(  # type: ignore[no-untyped-call]
                    n_workers=max(1, n), threads_per_worker=1, processes=True,
                    dashboard_address=None)
                own.append(cluster)
                client = Client(cluster)  # type: ignore[no-untyped-call]
            own.insert(0, client)
        futures, where = [], {}
        for i in todo:
            e = entries[i]
            fut = client.submit(run_cell, name, quick, e["seed"], str(cells_root), e["overrides"],
                                pure=False, key=f"cell-{i}-{secrets.token_hex(4)}")
            futures.append(fut)
            where[fut.key] = i
        for fut in as_completed(futures):  # type: ignore[no-untyped-call]
            i = where[fut.key]
            try:
                res = fut.result()
            except Exception as exc:  # KilledWorker (died too often) or a cell that could not start
                res = {"status": "failed", "path": None,
                       "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            finish(i, res)
    finally:
        for obj in own:
            obj.close()

