"""`reproduce --workers/--scheduler`: the experiments and their declared sweeps as dask tasks give
the serial numbers, resume (finished runs and cells kept), and a sweep feeds its experiment's run."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neurothermo.cli import app
from neurothermo.config import setting

pytest.importorskip("dask.distributed")

CHEAP = ["--only", "entropic-flow", "--only", "noise-term"]  # quick presets: ~1.5 s and ~2.5 s CPU


def _runs(root: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(p for p in d.iterdir() if p.is_dir())
            for d in root.iterdir() if d.is_dir() and d.name != "sweeps"}


def _numbers(run_dir: Path) -> tuple:
    s = json.loads((run_dir / "summary.json").read_text())
    return s["figures"], s["predictions"]


def test_workers_give_the_serial_numbers_and_resume(tmp_path: Path) -> None:
    cli = CliRunner()
    serial = cli.invoke(app, ["reproduce", "--quick", *CHEAP, "--out", str(tmp_path / "a")])
    assert serial.exit_code == 0, serial.output
    dist = cli.invoke(app, ["reproduce", "--quick", *CHEAP, "--workers", "2",
                            "--out", str(tmp_path / "b")])
    assert dist.exit_code == 0, dist.output
    a, b = _runs(tmp_path / "a"), _runs(tmp_path / "b")
    assert sorted(a) == sorted(b) == ["entropic-flow", "noise-term"]
    for name in a:
        (ra,), (rb,) = a[name], b[name]
        assert _numbers(ra) == _numbers(rb)               # exact: figures and predictions
        assert (rb / "status").read_text().strip() == "done"
    assert (tmp_path / "b" / "report.html").stat().st_size > 1000
    # Again: every run kept, nothing run twice.
    again = cli.invoke(app, ["reproduce", "--quick", *CHEAP, "--workers", "2",
                             "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    assert _runs(tmp_path / "b") == b
    assert " ".join(again.output.split()).count("kept") >= 2


@dataclass(frozen=True)
class FedConfig:
    scale: float = setting(1.0, "a scale", min=0.0)
    source: str = setting("", "a sweep folder to read")


@pytest.fixture
def fed_experiment(tmp_path: Path) -> Iterator[str]:
    """An experiment whose declared sweep (scale × 2 seeds) feeds its own run: the run sums the
    cells' values. A cell with scale 2 fails until the file ``fixed`` exists."""
    from neurothermo.experiments.base import REGISTRY, Experiment, SweepPlan, register

    def run(cfg: FedConfig, ctx) -> None:
        if cfg.source:
            index = json.loads((Path(cfg.source) / "index.json").read_text())
            total = sum(json.loads((Path(cfg.source) / e["path"] / "summary.json").read_text())
                        ["figures"]["value"] for e in index["cells"])
            ctx.record(total=total)
            ctx.predict("total", total, 9.0, 0.0)
            return
        if cfg.scale > 1.5 and not (tmp_path / "fixed").exists():
            raise RuntimeError("boom")
        ctx.record(value=cfg.scale * (ctx.seed + 1))

    name = "toy-fed"
    register(Experiment(name=name, title="toy fed", config=FedConfig, quick=FedConfig(),
                        full=FedConfig(), run=run,
                        sweep=SweepPlan(grid=("scale=1,2",), seeds=2, feeds="source")))
    yield name
    REGISTRY.pop(name, None)


def test_declared_sweep_feeds_its_run_and_failed_cells_rerun(tmp_path: Path, fed_experiment) -> None:
    from dask.distributed import Client

    from neurothermo.reproduce_dask import reproduce_on_dask

    # Threads in this process, so the worker sees the experiment this test registers.
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        first = reproduce_on_dask([fed_experiment, "entropic-flow"], quick=True, out=tmp_path / "r",
                                  client=c)
        fed, ef = first
        assert fed.status == "failed" and "2 cell(s) of its sweep" in fed.note and fed.path is None
        assert ef.status == "done" and ef.sweep is None
        (tmp_path / "fixed").write_text("")
        second = reproduce_on_dask([fed_experiment, "entropic-flow"], quick=True,
                                   out=tmp_path / "r", client=c)
    fed2, ef2 = second
    assert ef2.status == "kept" and ef2.path == ef.path
    assert fed2.status == "done" and fed2.sweep is not None and fed2.summary is not None
    # seeds 0, 1 at scale 1 and 2: 1 + 2 + 2 + 4 = 9, read from the sweep's folder
    assert fed2.summary["figures"]["total"] == 9.0 and fed2.summary["all_passed"]
    index = json.loads((fed2.sweep / "index.json").read_text())
    assert index["complete"] and [bool(e.get("kept")) for e in index["cells"]] == [True, True,
                                                                                   False, False]
    assert json.loads((fed2.path / "config.json").read_text())["settings"]["source"] == str(fed2.sweep)


def test_killed_worker_loses_no_run(tmp_path: Path) -> None:
    import os
    import signal
    import threading
    import time

    from dask.distributed import Client, LocalCluster

    from neurothermo.reproduce_dask import reproduce_on_dask

    names = ["noise-term", "entropic-flow"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(r=reproduce_on_dask(
            names, quick=True, out=tmp_path, client=client)))
        t.start()
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline and t.is_alive():
            # the worker whose task has a run folder in progress (task keys are run-<name>-<hex>;
            # entropic-flow's quick run takes under a second, so "any busy worker" could be one
            # whose run had just finished)
            running = {p.parent.parent.name for p in tmp_path.glob("*/*/status")
                       if p.read_text().strip() == "running"}
            busy = [w for w, keys in client.processing().items()
                    if any(str(k).startswith(tuple(f"run-{n}-" for n in running)) for k in keys)]
            if running and busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.05)
        t.join(timeout=120)
        assert killed is not None and not t.is_alive()
    outcomes = box["r"]
    assert [o.status for o in outcomes] == ["done", "done"]
    statuses = [p.read_text().strip() for p in tmp_path.glob("*/*/status")]
    # The killed run's folder stays at "running"; its rerun on the other worker finished.
    assert statuses.count("done") == 2 and statuses.count("running") >= 1
    assert all((o.path / "status").read_text().strip() == "done" for o in outcomes)
