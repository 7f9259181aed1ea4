"""The ``neurothermo`` command line: list, describe, run, reproduce, sweep, report, show, analyze."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from neurothermo._version import __version__
from neurothermo.seeding import MAX_SEED

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Measure the thermodynamics of neural-network training (entropic forces, symmetries, "
    "gradient balance, universal representations, sharpness).",
)
console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"neurothermo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """neurothermo."""


def _escape(text: str) -> str:
    from neurothermo.report import untrusted

    return untrusted(text)


def _print_cell(e: dict[str, Any], prefix: str) -> None:
    """One line per finished sweep cell (an index entry of ``neurothermo.sweep``), escaped."""
    what = " ".join(f"{k}={v}" for k, v in e["point"].items())
    status = "kept" if e.get("kept") else e["status"]
    err.print(_escape(f"  {prefix}{status:<7} {what} seed={e['seed']}  {e.get('reason', '')}"),
              highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _rich_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)

        yield advance


@app.command("list")
def list_cmd() -> None:
    """List the registered experiments, one line each."""
    from neurothermo.experiments.base import all_experiments

    for exp in all_experiments():
        missing = exp.missing()
        note = f"  [yellow](needs extra '{exp.extra}')[/]" if missing else ""
        console.print(f"[bold]{exp.name:<24}[/] {exp.title}{note}", highlight=False, soft_wrap=True)


@app.command()
def describe(name: Annotated[str, typer.Argument(help="Experiment name.")]) -> None:
    """Show an experiment's settings with their quick and full values."""
    from neurothermo.config import describe as describe_settings
    from neurothermo.experiments.base import UnknownExperiment, get_experiment

    try:
        exp = get_experiment(name)
    except UnknownExperiment as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"{exp.name}: {exp.title}", title_justify="left")
    for col in ("setting", "type", "quick", "full", "meaning"):
        table.add_column(col, overflow="fold")
    for key, tp, _default, help_text in describe_settings(exp.config):
        table.add_row(key, tp, str(getattr(exp.quick, key)), str(getattr(exp.full, key)), help_text)
    console.print(table)
    if exp.cost:
        console.print(f"cost: {exp.cost}")


def _run_one(name: str, quick: bool, seed: int, out: str, overrides: list[str]) -> Any:
    from neurothermo.config import ConfigError
    from neurothermo.experiments.base import MissingExtra, UnknownExperiment
    from neurothermo.runner import ExperimentFailed, run_experiment
    from neurothermo.runstore import RunStoreError

    try:
        return run_experiment(name, quick=quick, seed=seed, out=out, overrides=overrides,
                              progress_factory=_rich_progress)
    except (UnknownExperiment, ConfigError, RunStoreError, MissingExtra) as exc:
        raise _fail(str(exc), 2) from None
    except ExperimentFailed as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)  # RunInterrupted carries SIGTERM/SIGHUP; Ctrl-C is 2
        raise _fail("interrupted; the run folder keeps status 'interrupted' and all metrics so "
                    "far", 128 + signum) from None


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="Experiment name (see `neurothermo list`).")],
    quick: Annotated[bool, typer.Option("--quick", help="Use the quick preset.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for torch, numpy and random.", min=0,
                                      max=MAX_SEED)] = 0,
    out: Annotated[str, typer.Option(help="Root folder of the run store.")] = "runs",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a setting: --set key=value (repeatable).")] = None,
) -> None:
    """Run one experiment into OUT/<experiment>/<timestamp>-<id>/."""
    from neurothermo.report import print_summary

    result = _run_one(name, quick, seed, out, list(set_ or []))
    print_summary(result.path, console)
    console.print(f"run folder: {result.path}")


@app.command()
def reproduce(
    quick: Annotated[bool, typer.Option("--quick", help="Quick presets (minutes on a laptop).")] = False,
    full: Annotated[bool, typer.Option("--full", help="Full presets (the default; see `describe` "
                                                      "for each one's cost).")] = False,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Run only this experiment (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every experiment.", min=0, max=MAX_SEED)] = 0,
    out: Annotated[str, typer.Option(help="Root folder of the run store.")] = "runs",
    rerun: Annotated[bool, typer.Option("--rerun", help="Run again even where a finished run "
                                                        "with the same settings exists.")] = False,
    scheduler: Annotated[str | None, typer.Option(help="Run on the dask cluster at this address "
                                                       "(tcp://host:8786); OUT must be shared.")] = None,
    workers: Annotated[int | None, typer.Option(help="Run on a dask LocalCluster of N single-"
                                                     "threaded worker processes.", min=1)] = None,
) -> None:
    """Run every registered experiment, then write OUT/report.html.

    Resumable: an experiment that already has a finished (`done`) run with the same preset, seed
    and settings under OUT is kept, not rerun; failed, interrupted or killed runs are run again.
    Experiments whose optional extra is missing are skipped with a note.

    With --workers or --scheduler the experiments run as tasks on dask.distributed, together with
    the sweeps they declare (their seeds and grids, into OUT/sweeps/; sharpness-phase's phase
    diagram cell by cell), resumable the same way (see docs/sweeps.md, also for Slurm/PBS).
    """
    from neurothermo.experiments.base import UnknownExperiment, all_experiments, get_experiment
    from neurothermo.htmlreport import write_report
    from neurothermo.report import print_summary
    from neurothermo.runner import find_finished
    from neurothermo.runstore import RunStoreError, check_writable, read_summary

    if quick and full:
        raise _fail("choose one of --quick and --full", 2)
    try:
        check_writable(out)
        chosen = [get_experiment(n) for n in only] if only else all_experiments()
    except (RunStoreError, UnknownExperiment) as exc:
        raise _fail(str(exc), 2) from None
    rows: list[tuple[str, str, str, str]] = []
    failed = False
    if workers is not None or scheduler is not None:
        failed = _reproduce_on_dask([e.name for e in chosen], quick, seed, out, rerun, workers,
                                    scheduler, rows)
        chosen = []
    for exp in chosen:
        if exp.missing():
            rows.append((exp.name, "skipped", f"needs extra '{exp.extra}'", ""))
            continue
        console.rule(f"{exp.name}")
        done = None if rerun else find_finished(exp.name, quick=quick, seed=seed, out=out)
        if done is not None:
            console.print(f"kept: finished run {done} (same preset, seed and settings)",
                          highlight=False)
            summary = read_summary(done)
            path = done
        else:
            try:
                result = _run_one(exp.name, quick, seed, out, [])
            except typer.Exit as exc:
                if exc.exit_code > 128:  # a signal (Ctrl-C, SIGTERM, SIGHUP) stops the whole run
                    raise
                failed = True
                rows.append((exp.name, "failed", "see error above", ""))
                continue
            print_summary(result.path, console)
            summary, path = result.summary, result.path
        preds = summary["predictions"]
        passed = sum(p["passed"] for p in preds)
        rows.append((exp.name, "kept" if done is not None else "done",
                     f"{passed}/{len(preds)} predictions hold", str(path)))
    table = Table(title="reproduce " + ("--quick" if quick else "(full)"), title_justify="left")
    for col in ("experiment", "status", "result", "run folder"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(_escape(c) for c in r))
    console.print(table)
    report = write_report(out)
    console.print(f"report: {report}", highlight=False)
    if failed:
        raise typer.Exit(1)


def _reproduce_on_dask(names: list[str], quick: bool, seed: int, out: str, rerun: bool,
                      workers: int | None, scheduler: str | None,
                      rows: list[tuple[str, str, str, str]]) -> bool:
    """The experiments and their declared sweeps as dask tasks; fills ``rows``; True if one failed."""
    from neurothermo.report import print_summary
    from neurothermo.reproduce_dask import Outcome, reproduce_on_dask
    from neurothermo.sweep import SweepError

    def show(o: Outcome) -> None:
        if o.status in ("done", "kept") and o.path is not None:
            console.rule(f"{o.name} ({o.status})")
            print_summary(o.path, console)
        elif o.status == "failed":
            err.print("[red]error:[/] " + _escape(f"{o.name} failed: {o.note}"), highlight=False,
                      soft_wrap=True)

    def cell(e: dict[str, Any]) -> None:
        _print_cell(e, "cell ")

    try:
        outcomes = reproduce_on_dask(names, quick=quick, seed=seed, out=out, rerun=rerun,
                                     workers=workers, scheduler=scheduler, on_outcome=show,
                                     on_cell=cell)
    except SweepError as exc:
        raise _fail(_escape(str(exc)), 2) from None
    except KeyboardInterrupt as exc:
        raise _fail("interrupted; finished runs and cells are kept: run the same command again "
                    "to resume", 128 + getattr(exc, "signum", 2)) from None
    for o in outcomes:
        if o.status in ("done", "kept") and o.summary is not None:
            preds = o.summary["predictions"]
            result = f"{sum(p['passed'] for p in preds)}/{len(preds)} predictions hold"
        else:
            result = o.note if o.status == "skipped" else "see error above"
        where = str(o.path or "") + (f" (sweep {o.sweep})" if o.sweep else "")
        rows.append((o.name, o.status, result, where))
    return any(o.status == "failed" for o in outcomes)


@app.command()
def sweep(
    name: Annotated[str, typer.Argument(help="Experiment name (see `neurothermo list`).")],
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", help="An axis: key=v1,v2 or key=start:stop:count[:log] (repeatable).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per grid point.", min=1)] = None,
    seed: Annotated[int, typer.Option(help="First seed.", min=0, max=MAX_SEED)] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="Start every cell from the quick preset.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a setting in every cell: --set key=value (repeatable).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of a running dask scheduler "
                                                       "(tcp://host:8786); OUT must be shared.")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes (default: CPU "
                                                     "count); 0 runs cells here, without dask.",
                                                min=0)] = None,
    out: Annotated[str, typer.Option(help="Root folder of the run store.")] = "runs",
    rerun: Annotated[bool, typer.Option("--rerun", help="Start a fresh sweep folder.")] = False,
) -> None:
    """Run a grid over settings and seeds into OUT/sweeps/<name>-<stamp>/ (see docs/sweeps.md).

    Without --grid and --seeds the experiment's declared sweep runs. Resumable: the same command
    again keeps finished cells and reruns failed or interrupted ones.
    """
    from neurothermo.config import ConfigError
    from neurothermo.experiments.base import MissingExtra, UnknownExperiment
    from neurothermo.runstore import RunStoreError
    from neurothermo.sweep import SweepError, run_sweep

    def line(e: dict[str, Any]) -> None:
        _print_cell(e, "")

    try:
        result = run_sweep(name, grid=grid, seeds=seeds, first_seed=seed, quick=quick,
                           base=list(set_ or []), out=out, workers=workers, scheduler=scheduler,
                           rerun=rerun, on_cell=line)
    except (UnknownExperiment, ConfigError, RunStoreError, MissingExtra, SweepError,
            ValueError) as exc:
        raise _fail(_escape(str(exc)), 2) from None
    except KeyboardInterrupt as exc:
        raise _fail("interrupted; finished cells are kept: run the same command again to "
                    "resume", 128 + getattr(exc, "signum", 2)) from None
    from neurothermo.sweep_table import print_table

    print_table(result.rows, result.keys, console)
    console.print(f"sweep folder: {result.path}", highlight=False)
    if result.failed:
        raise _fail(f"{len(result.failed)} cell(s) failed; run the same command again to rerun them")


@app.command()
def analyze(
    spec: Annotated[str | None, typer.Argument(help="A spec file defining model(), loss_fn and "
                                                    "data(). Loading it EXECUTES it.")] = None,
    template: Annotated[bool, typer.Option("--template", help="Print a documented spec that "
                                                              "runs as is, and exit.")] = False,
    lr: Annotated[float, typer.Option(help="Learning rate η.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="SGD batch size b.")] = 32,
    weight_decay: Annotated[float, typer.Option(help="torch's wd (the paper's γ = wd/2).")] = 0.0,
    steps: Annotated[int, typer.Option(help="SGD steps of a short monitored run (0: none).")] = 0,
    k: Annotated[int, typer.Option(help="Number of top Hessian eigenvalues.")] = 3,
    compare: Annotated[str | None, typer.Option(help="A second spec: layer × layer alignment "
                                                     "on the same inputs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.", min=0, max=MAX_SEED)] = 0,
    out: Annotated[str, typer.Option(help="Root folder of the run store.")] = "runs",
) -> None:
    """Analyse your own model: symmetries, entropic terms, sharpness, a short monitored run.

    SPEC.py defines model() -> nn.Module, loss_fn (mean-reduced; None when the model returns its
    loss) and data() -> (inputs, targets) or a DataLoader. Loading a spec executes it: analyse only
    files you trust. Writes a run folder with analysis.html.
    """
    from neurothermo.analyze import EXPERIMENT, TEMPLATE, SpecError, load_spec
    from neurothermo.experiments.base import REGISTRY, register

    if template:
        typer.echo(TEMPLATE, nl=False)
        return
    if spec is None:
        raise _fail("give a spec file (neurothermo analyze SPEC.py), or --template for one", 2)
    try:  # bad specs are refused before a run folder exists
        load_spec(spec)
        if compare:
            load_spec(compare)
    except SpecError as exc:
        raise _fail(_escape(str(exc)), 2) from None
    if "analyze" not in REGISTRY:
        register(EXPERIMENT)
    overrides = [f"spec={spec}", f"lr={lr}", f"batch_size={batch_size}",
                 f"weight_decay={weight_decay}", f"steps={steps}", f"k={k}",
                 f"compare={compare or ''}"]
    result = _run_one("analyze", False, seed, out, overrides)
    console.print(f"analysis: {result.path / 'analysis.html'}", highlight=False)


@app.command()
def report(
    runs_dir: Annotated[str, typer.Argument(help="The run store (a folder of experiment folders).")] = "runs",
    out: Annotated[str | None, typer.Option(help="Where to write the page "
                                                 "(default RUNS_DIR/report.html).")] = None,
) -> None:
    """Write a self-contained HTML report of the newest run of every experiment in RUNS_DIR."""
    from neurothermo.htmlreport import write_report

    try:
        path = write_report(runs_dir, out)
    except (FileNotFoundError, OSError) as exc:
        raise _fail(_escape(str(exc)), 2) from None
    console.print(f"report: {path}", highlight=False)


@app.command()
def show(run_dir: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Print a run's summary (predictions and figures) as tables."""
    from neurothermo.report import print_summary
    from neurothermo.runstore import RunReadError

    try:
        print_summary(run_dir, console)
    except (FileNotFoundError, RunReadError) as exc:
        raise _fail(_escape(str(exc)), 2) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
