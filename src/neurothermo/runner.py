"""Run a registered experiment into a run folder (the stateful edge around ``Experiment.run``)."""
from __future__ import annotations

import datetime as _dt
import errno
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from neurothermo.config import apply_overrides, to_dict, validate_config
from neurothermo.experiments.base import MissingExtra, RunContext, get_experiment
from neurothermo.runstore import Run, check_writable, environment
from neurothermo.seeding import MAX_SEED, seed_everything

DEFAULT_ROOT = Path("runs")
# errno values that mean "no room to write": disk full, file-size limit (ulimit -f), quota.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGINT, SIGTERM, SIGHUP): its folder says ``interrupted``.

    ``signum`` is the signal's number; the CLI exits with ``128 + signum`` as shells do.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise :class:`RunInterrupted`, as Ctrl-C raises
    KeyboardInterrupt, so the run records ``interrupted`` with its metrics instead of dying with
    ``running``. Only the main thread can own signal handlers; elsewhere this does nothing. The
    previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise RunInterrupted(signum)

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _describe_failure(exc: BaseException, run_dir: Path) -> str:
    """One line naming the failure; a full disk or a file-size limit is named as such."""
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
        return (f"no room to write in {run_dir} ({exc.strerror}: the disk is full or a file-size "
                "limit was hit); free space or choose another --out")
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _try(write: Callable[[], Any]) -> bool:
    """Run one write of a failure record; a write that fails (no room left) is skipped so the
    later, smaller writes still get their chance."""
    try:
        write()
    except OSError:
        return False
    return True


def check_seed(seed: Any) -> int:
    """A seed is an int in ``[0, 2**63 − 1]`` (what torch's generators accept)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (2**63 - 1), got {seed!r}")
    return seed


class ExperimentFailed(RuntimeError):
    """The experiment raised; the run folder holds ``status = failed`` and ``traceback.txt``."""

    def __init__(self, run_dir: Path, reason: str) -> None:
        super().__init__(f"{reason} (traceback in {run_dir / 'traceback.txt'})")
        self.run_dir = run_dir
        self.reason = reason


@dataclass(frozen=True)
class RunResult:
    """The outcome of :func:`run_experiment`; ``all_passed`` says whether every prediction held.

    Attributes:
        path: the run folder.
        status: ``"done"`` (the other outcomes raise).
        summary: the content of ``summary.json``.
    """

    path: Path
    status: str
    summary: dict[str, Any]

    @property
    def all_passed(self) -> bool:
        return all(p["passed"] for p in self.summary.get("predictions", []))


def find_finished(name: str, *, quick: bool = False, seed: int = 0,
                  out: Path | str = DEFAULT_ROOT, overrides: Iterable[str] = ()) -> Path | None:
    """The newest ``done`` run of ``name`` under ``out`` made with the same preset, seed and final
    settings as these arguments would give, or None. What ``reproduce`` uses to resume: a finished
    run is kept, a failed, interrupted or still-``running`` (killed) one is run again."""
    import json

    exp = get_experiment(name)
    cfg = apply_overrides(validate_config(exp.preset(quick)), overrides)
    want = {"preset": "quick" if quick else "full", "settings": to_dict(cfg)}
    folder = Path(out) / exp.name
    if not folder.is_dir():
        return None
    for run_dir in sorted((p for p in folder.iterdir() if p.is_dir()), reverse=True):
        if (run_dir / "status").exists() and run_dir.joinpath("status").read_text().strip() == "done":
            try:
                config = json.loads((run_dir / "config.json").read_text())
                env = json.loads((run_dir / "env.json").read_text())
            except (OSError, ValueError):
                continue
            if ({k: config.get(k) for k in want} == json.loads(json.dumps(want))
                    and env.get("seed") == seed):
                return run_dir
    return None


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    seed: int = 0,
    out: Path | str = DEFAULT_ROOT,
    overrides: Iterable[str] = (),
    progress_factory: Callable[[str, int | None], Any] | None = None,
) -> RunResult:
    """Run experiment ``name`` and return its folder and summary.

    Order of checks, all before anything is created: the seed (an int in ``[0, 2**63 − 1]``), the
    name (unknown → error listing the available ones), the optional extra it needs, the settings
    (``key=value`` overrides, type- and range-checked, finite), the output folder (non-empty and
    writable). Then the run folder is created with ``status = running``, and every way out of it
    leaves a true status: Ctrl-C, SIGTERM or SIGHUP leave ``interrupted`` with every metric so far
    (raising :class:`RunInterrupted`, a KeyboardInterrupt); any exception, including a full disk,
    leaves ``failed`` with ``traceback.txt`` and raises :class:`ExperimentFailed`. When the disk is
    full the failure record is written with the room that is left: the status first, then the
    traceback and the summary.

    Args:
        name: the registered experiment's name.
        quick: run the quick preset instead of the full one.
        seed: the seed, an int in ``[0, 2**63 − 1]``.
        out: the root folder; the run goes to ``out/<name>/<timestamp>-<id>``.
        overrides: ``"key=value"`` settings over the preset.
        progress_factory: ``(description, total) -> context manager yielding advance(n)``;
            None: silent.

    Returns:
        A :class:`RunResult`: the run folder, its status (``"done"``) and ``summary.json``'s
        content (predictions, figures, timing).

    Raises:
        ValueError: a bad seed.
        UnknownExperiment, MissingExtra, ConfigError, RunStoreError: bad input, before any work.
        ExperimentFailed: the experiment (or writing its results) raised.
        RunInterrupted: a signal stopped the run.

    Example:
        >>> import dataclasses, tempfile
        >>> from neurothermo.experiments import (REGISTRY, Experiment, register, run_experiment,
        ...                                      setting)
        >>> @dataclasses.dataclass(frozen=True)
        ... class Cfg:
        ...     n: int = setting(100, "number of terms", min=2)
        >>> def run(cfg: Cfg, ctx) -> None:  # ctx: the RunContext
        ...     mean = sum(range(cfg.n)) / cfg.n
        ...     ctx.predict("mean", mean, (cfg.n - 1) / 2, 1e-12, why="exact arithmetic")
        >>> exp = register(Experiment(name="toy-mean", title="The mean of 0 … n−1", config=Cfg,
        ...                           quick=Cfg(10), full=Cfg(), run=run))
        >>> res = run_experiment("toy-mean", quick=True, out=tempfile.mkdtemp(), overrides=["n=20"])
        >>> res.status, res.all_passed, res.summary["predictions"][0]["measured"]
        ('done', True, 9.5)
        >>> del REGISTRY["toy-mean"]  # (a doctest: leave the registry as it was)
    """
    check_seed(seed)
    exp = get_experiment(name)
    missing = exp.missing()
    if missing:
        extra = exp.install or (f'pip install -e ".[{exp.extra}]"' if exp.extra else "install them")
        raise MissingExtra(
            f"experiment {name!r} needs {', '.join(missing)}, which is not installed; {extra}"
        )
    cfg = apply_overrides(validate_config(exp.preset(quick)), overrides)
    check_writable(out)
    run = Run.create(Path(out), exp.name)
    ctx = RunContext(run=run, seed=seed, quick=quick, progress_factory=progress_factory)
    started = time.monotonic()

    def summary(status: str, **extra: Any) -> dict[str, Any]:
        return {
            "experiment": exp.name,
            "title": exp.title,
            "status": status,
            "preset": "quick" if quick else "full",
            "seed": seed,
            "seconds": round(time.monotonic() - started, 3),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "figures": ctx.figures,
            "predictions": [asdict(p) for p in ctx.predictions],
            "all_passed": all(p.passed for p in ctx.predictions),
            "files": sorted(ctx.figure_files),
            **extra,
        }

    with _signals_interrupt():
        try:
            run.write_json("config.json", {"experiment": exp.name,
                                           "preset": "quick" if quick else "full",
                                           "overrides": list(overrides), "settings": to_dict(cfg)})
            run.write_json("env.json", environment(seed))
            seed_everything(seed)
            saved_threads = torch.get_num_threads()
            if exp.threads:
                torch.set_num_threads(exp.threads)
            try:
                exp.run(cfg, ctx)
            finally:
                torch.set_num_threads(saved_threads)
            run.flush()
            result = summary("done")
            run.write_json("summary.json", result)
            run.set_status("done")
        except KeyboardInterrupt:
            _try(run.flush)
            _try(lambda: run.write_json("summary.json", summary("interrupted")))
            _try(lambda: run.set_status("interrupted"))
            raise
        except Exception as exc:
            reason = _describe_failure(exc, run.path)
            _try(lambda: run.set_status("failed"))
            _try(lambda: run.write_text("traceback.txt", traceback.format_exc()))
            _try(run.flush)
            _try(lambda: run.write_json("summary.json", summary("failed", reason=reason)))
            raise ExperimentFailed(run.path, f"{exp.name} failed: {reason}") from exc
    return RunResult(run.path, "done", result)
