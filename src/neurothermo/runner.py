"""Run a registered experiment into a run folder (the stateful edge around ``Experiment.run``)."""
from __future__ import annotations

import datetime as _dt
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neurothermo.config import apply_overrides, to_dict, validate_config
from neurothermo.experiments.base import MissingExtra, RunContext, get_experiment
from neurothermo.runstore import Run, check_writable, environment
from neurothermo.seeding import seed_everything

DEFAULT_ROOT = Path("runs")


class ExperimentFailed(RuntimeError):
    """The experiment raised; the run folder holds ``status = failed`` and ``traceback.txt``."""

    def __init__(self, run_dir: Path, reason: str) -> None:
        super().__init__(f"{reason} (traceback in {run_dir / 'traceback.txt'})")
        self.run_dir = run_dir
        self.reason = reason


@dataclass(frozen=True)
class RunResult:
    path: Path
    status: str
    summary: dict[str, Any]

    @property
    def all_passed(self) -> bool:
        return all(p["passed"] for p in self.summary.get("predictions", []))


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

    Order of checks, all before any work: the name (unknown → error listing the available ones),
    the optional extra it needs, the settings (``key=value`` overrides, type- and range-checked),
    the output folder (must be writable). Then the run folder is created with ``status =
    running``; Ctrl-C leaves ``interrupted`` with every metric so far, an exception leaves
    ``failed`` with ``traceback.txt`` and raises :class:`ExperimentFailed`.
    """
    exp = get_experiment(name)
    missing = exp.missing()
    if missing:
        extra = exp.install or (f'pip install -e ".[{exp.extra}]"' if exp.extra else "install them")
        raise MissingExtra(
            f"experiment {name!r} needs {', '.join(missing)}, which is not installed; {extra}"
        )
    cfg = apply_overrides(validate_config(exp.preset(quick)), overrides)
    check_writable(Path(out))
    run = Run.create(Path(out), exp.name)
    run.write_json("config.json", {"experiment": exp.name, "preset": "quick" if quick else "full",
                                   "overrides": list(overrides), "settings": to_dict(cfg)})
    run.write_json("env.json", environment(seed))
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
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "figures": ctx.figures,
            "predictions": [asdict(p) for p in ctx.predictions],
            "all_passed": all(p.passed for p in ctx.predictions),
            "files": sorted(ctx.figure_files),
            **extra,
        }

    seed_everything(seed)
    try:
        exp.run(cfg, ctx)
    except KeyboardInterrupt:
        run.flush()
        run.write_json("summary.json", summary("interrupted"))
        run.set_status("interrupted")
        raise
    except Exception as exc:
        run.flush()
        run.write_text("traceback.txt", traceback.format_exc())
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        run.write_json("summary.json", summary("failed", reason=reason))
        run.set_status("failed")
        raise ExperimentFailed(run.path, f"{exp.name} failed: {reason}") from exc
    run.flush()
    result = summary("done")
    run.write_json("summary.json", result)
    run.set_status("done")
    return RunResult(run.path, "done", result)
