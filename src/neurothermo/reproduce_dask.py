"""``neurothermo reproduce --workers N`` / ``--scheduler ADDRESS``: experiments as dask tasks.

The serial ``reproduce`` runs the experiments one after another in its own process. With a
scheduler (a ``LocalCluster`` of ``workers`` single-threaded processes, or the cluster at
``scheduler``) every experiment's run is a task, and every declared sweep (an experiment's seeds
and grids, :class:`neurothermo.experiments.base.SweepPlan`) runs through
:func:`neurothermo.sweep.run_sweep` on the same client, its cells tasks too. There is one
implementation of a task: :func:`neurothermo.sweep.run_cell`, which runs
:func:`neurothermo.runner.run_experiment` with one torch thread, so each run gives the numbers the
serial path gives.

Order: the runs that need nothing are submitted first and run while the sweeps run. A sweep whose
plan ``feeds`` a setting of the experiment's own run (``sharpness-phase``: ``grid_from``, its phase
diagram computed cell by cell) runs before that run, which then gets ``FEEDS=<sweep folder>``.

Resumable as the serial path: a run with a finished (``done``) run folder of the same preset,
seed and settings under ``out`` is kept (:func:`neurothermo.runner.find_finished`), and so is every
finished sweep cell; failed, interrupted or killed ones run again. dask reschedules the tasks of a
worker that dies; a finished run is its run folder, so killing the driver loses none.
This module is the edge: nothing in the core imports it.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurothermo.experiments.base import Experiment, get_experiment
from neurothermo.runner import find_finished
from neurothermo.runstore import check_writable, read_summary
from neurothermo.sweep import SweepError, run_cell, run_sweep


@dataclass(frozen=True)
class Outcome:
    """One experiment of a distributed reproduce.

    ``status``: ``done`` (ran now), ``kept`` (an earlier finished run), ``failed`` or ``skipped``
    (its extra is missing). ``path``: its run folder; ``sweep``: its sweep folder, if it declares one.
    """

    name: str
    status: str
    path: Path | None = None
    summary: dict[str, Any] | None = None
    note: str = ""
    sweep: Path | None = None


@contextmanager
def _client(workers: int | None, scheduler: str | None, client: Any) -> Iterator[Any]:
    if client is not None:
        yield client
        return
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise SweepError('dask.distributed is not installed; pip install -e ".[dist]", or run '
                         "reproduce without --workers and --scheduler") from None
    if scheduler:
        # dask ships these unannotated
        with Client(scheduler) as c:  # type: ignore[no-untyped-call]
            yield c
        return
    with LocalCluster(  # type: ignore[no-untyped-call]  # dask ships it unannotated
            n_workers=max(1, workers or 1), threads_per_worker=1, processes=True,
            dashboard_address=None) as cluster, \
            Client(cluster) as c:  # type: ignore[no-untyped-call]
        yield c


def reproduce_on_dask(
    names: Sequence[str],
    *,
    quick: bool = False,
    seed: int = 0,
    out: Path | str = "runs",
    rerun: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> list[Outcome]:
    """Run experiments ``names`` (and their declared sweeps) as tasks on dask; resumable.

    Args:
        names: experiments, in the order of the returned outcomes.
        quick, seed: the preset and the seed of every run (a sweep's seeds start at ``seed``).
        out: the run store; sweeps go to ``out/sweeps/`` as with ``neurothermo sweep``.
        rerun: run again even where a finished run exists (and start fresh sweep folders).
        workers: a ``LocalCluster`` of this many single-threaded worker processes.
        scheduler: address of a running dask scheduler; its workers must see ``out``.
        client: an existing ``dask.distributed.Client`` (then ``workers``/``scheduler`` are unused).
        on_outcome: called as each experiment finishes (or is kept, skipped, failed).
        on_cell: called with each sweep cell's index entry as it finishes (see ``run_sweep``).

    Returns:
        One :class:`Outcome` per experiment, in the order of ``names``.

    Example (what ``neurothermo reproduce --quick --only noise-term --workers 2`` runs)::

        outcomes = reproduce_on_dask(["noise-term"], quick=True, out="runs", workers=2)
        outcomes[0].status, outcomes[0].summary["all_passed"]     # ('done', True)

    Raises:
        UnknownExperiment: a name is not registered (before anything runs).
        RunStoreError: ``out`` is not writable (before anything runs).
        SweepError: dask is not installed.
    """
    exps = [get_experiment(n) for n in names]
    root = check_writable(Path(out)).resolve()  # absolute: workers may run in another folder
    outcomes: dict[str, Outcome] = {}

    def settle(o: Outcome) -> None:
        outcomes[o.name] = o
        if on_outcome is not None:
            on_outcome(o)

    runnable: list[Experiment] = []
    for exp in exps:
        if exp.missing():
            settle(Outcome(exp.name, "skipped", note=f"needs extra '{exp.extra}'"))
        else:
            runnable.append(exp)
    with _client(workers, scheduler, client) as cl:
        from dask.distributed import as_completed

        futures: dict[str, tuple[str, Any, Path | None]] = {}

        def submit(exp: Experiment, overrides: list[str], sweep: Path | None = None) -> None:
            done = None if rerun else find_finished(exp.name, quick=quick, seed=seed, out=root,
                                                    overrides=overrides)
            if done is not None:
                settle(Outcome(exp.name, "kept", done, read_summary(done), sweep=sweep))
                return
            fut = cl.submit(run_cell, exp.name, quick, seed, str(root), overrides, pure=False,
                            key=f"run-{exp.name}-{secrets.token_hex(4)}")
            futures[fut.key] = (exp.name, fut, sweep)

        for exp in runnable:
            if exp.sweep is None or exp.sweep.feeds is None:
                submit(exp, [])
        sweeps: dict[str, Path] = {}
        for exp in runnable:
            if exp.sweep is None:
                continue
            res = run_sweep(exp.name, quick=quick, first_seed=seed, out=root, client=cl,
                            rerun=rerun, on_cell=on_cell)
            sweeps[exp.name] = res.path
            if exp.sweep.feeds is None:
                continue
            if res.failed:
                settle(Outcome(exp.name, "failed", note=f"{len(res.failed)} cell(s) of its sweep "
                               f"{res.path} failed", sweep=res.path))
            else:
                submit(exp, [f"{exp.sweep.feeds}={res.path}"], res.path)
        for fut in as_completed(  # type: ignore[no-untyped-call]  # dask, unannotated
                [f for _, f, _ in futures.values()]):
            name, _, sweep = futures[fut.key]
            sweep = sweep or sweeps.get(name)
            try:
                r = fut.result()
            except Exception as exc:  # KilledWorker (died too often), or a run that could not start
                settle(Outcome(name, "failed", note=f"{type(exc).__name__}: {exc}".splitlines()[0],
                               sweep=sweep))
                continue
            if r["status"] == "done":
                path = Path(r["path"])
                settle(Outcome(name, "done", path, read_summary(path), sweep=sweep))
            else:
                settle(Outcome(name, "failed", Path(r["path"]) if r.get("path") else None,
                               note=r.get("reason", ""), sweep=sweep))
        for name, path in sweeps.items():  # kept runs learn of their sweep folder too
            o = outcomes[name]
            if o.sweep is None:
                outcomes[name] = Outcome(o.name, o.status, o.path, o.summary, o.note, path)
    return [outcomes[e.name] for e in exps]
