"""Sweeps: grid checks before anything runs, aggregation against references, serial == dask,
a killed worker loses nothing, a SIGKILLed driver loses no finished cell."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neurothermo.config import ConfigError
from neurothermo.experiments.base import SweepPlan
from neurothermo.sweep import SweepError, run_sweep
from neurothermo.sweep_grid import parse_axis
from neurothermo.sweep_table import cell_edges, mean_se

NAME = "rescale-equilibrium"
# Tiny cells (~0.2 s CPU each): short SGD chains whose result depends on the seed.
TINY = ["chains=2", "gd_steps=1", "block=256", "steps=1000"]


def _config():
    from neurothermo.experiments.base import get_experiment

    return get_experiment(NAME).config


@pytest.mark.parametrize(("specs", "key"), [
    (["lrx=0.1"], "lrx"),                      # unknown key
    (["lr=abc"], "lr"),                        # unparsable value
    (["lr=0.1:0.2:0"], "lr"),                  # empty range
    (["lr="], "lr"),                           # no values
    (["lr=0.001", "lr=0.002"], "lr"),          # duplicate key
    (["lr=0.001,0.001"], "lr"),                # repeated value
    (["u0=0.4,3"], "u0"),                      # a list-valued setting
    (["steps=1000:2000:3"], "steps"),         # non-integer values for an int setting
    (["lr=0.5"], "lr"),                        # out of range (max 0.1) in a cell
    (["steps=2000"], "steps"),                 # both axis and --set (TINY sets steps)
])
def test_bad_grids_name_the_key_before_anything_runs(tmp_path: Path, specs, key) -> None:
    with pytest.raises(ConfigError, match=repr(key)):
        run_sweep(NAME, grid=specs, seeds=1, quick=True, base=TINY, out=tmp_path, workers=0)
    assert not (tmp_path / "sweeps").exists()


def test_no_declared_sweep_and_bad_seeds(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="declares no sweep"):
        run_sweep("entropic-flow", out=tmp_path, workers=0)
    with pytest.raises(ValueError, match="seeds"):
        run_sweep(NAME, grid=["lr=0.001"], seeds=0, out=tmp_path, workers=0)


def test_axis_values() -> None:
    cfg = _config()
    lin = parse_axis("lr=0.01:0.08:8", cfg).values
    assert lin == tuple(round(0.01 * (i + 1), 12) for i in range(8))
    geo = parse_axis("lr=0.001:0.1:3:log", cfg).values
    assert geo == pytest.approx((0.001, 0.01, 0.1), rel=1e-12)
    assert parse_axis("steps=1000:3000:3", cfg).values == (1000, 2000, 3000)
    assert parse_axis("noise=0.5,1", cfg).values == (0.5, 1.0)


def test_mean_se_and_edges_against_references() -> None:
    xs = [1.0, 2.5, 4.0, 3.25]
    m, se = mean_se(xs)
    assert m == pytest.approx(statistics.mean(xs), abs=1e-15)
    assert se == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)), rel=1e-14)
    assert mean_se([2.0]) == (2.0, None)
    edges, log, labels = cell_edges([0.1, 0.2, 0.4])
    # 0.1, 0.2, 0.4 is geometric (ratio 2): geometric midpoints √(0.02), √(0.08), mirrored ends.
    assert log and labels is None
    assert edges == pytest.approx([0.1 / math.sqrt(2), math.sqrt(0.02), math.sqrt(0.08),
                                   0.4 * math.sqrt(2)], rel=1e-12)
    edges, log, _ = cell_edges([1.0, 2.0, 3.0])
    assert not log and edges == pytest.approx([0.5, 1.5, 2.5, 3.5])
    edges, _, labels = cell_edges(["tanh", "relu"])
    assert edges == [-0.5, 0.5, 1.5] and labels == ["tanh", "relu"]


def _numbers(result) -> dict:
    """Per cell (point, seed): its figures and predictions, from the run folders."""
    out = {}
    for e in result.cells:
        s = json.loads((result.path / e["path"] / "summary.json").read_text())
        out[(tuple(sorted(e["point"].items())), e["seed"])] = (s["figures"], s["predictions"])
    return out


def test_serial_and_local_cluster_give_identical_numbers(tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed")
    kw = {"grid": ["lr=0.002,0.004"], "seeds": 2, "quick": True, "base": TINY}
    serial = run_sweep(NAME, out=tmp_path / "a", workers=0, **kw)
    dist = run_sweep(NAME, out=tmp_path / "b", workers=2, **kw)
    assert not serial.failed and not dist.failed and len(serial.cells) == 4
    assert _numbers(serial) == _numbers(dist)          # exact, cell by cell
    assert serial.rows == dist.rows                    # and the aggregate over seeds
    # The seeds really differ (a sweep that ran one seed twice would show se == 0).
    p1 = serial.rows[0]["predictions"]
    assert all(e["n"] == 2 for e in p1.values())
    assert next(iter(p1.values()))["se"] > 0
    # The aggregate matches an independent mean/se of the cells' measured values.
    name = next(iter(p1))
    vals = [p["measured"] for (pt, _), (_, ps) in _numbers(serial).items()
            if dict(pt)["lr"] == 0.002 for p in ps if p["name"] == name]
    assert p1[name]["mean"] == pytest.approx(statistics.mean(vals), rel=1e-15)
    assert p1[name]["se"] == pytest.approx(statistics.stdev(vals) / math.sqrt(2), rel=1e-12)
    table = (serial.path / "table.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("lr,seeds_done,")
    index = json.loads((serial.path / "index.json").read_text())
    assert index["complete"] and index["heatmaps"]
    assert all((serial.path / f).stat().st_size > 1000 for f in index["heatmaps"])
    # Same command again: every cell kept, none rerun.
    again = run_sweep(NAME, out=tmp_path / "a", workers=0, **kw)
    assert again.path == serial.path and all(e.get("kept") for e in again.cells)


def _statuses(folder: Path) -> list[str]:
    return [p.read_text().strip() for p in folder.glob("cells/*/*/status")]


def test_killed_worker_has_its_cells_rerun(tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed")
    from dask.distributed import Client, LocalCluster

    # Cells of ~1 s so a kill lands while one runs.
    base = ["chains=2", "gd_steps=1", "block=256", "steps=8000"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(r=run_sweep(
            NAME, grid=["lr=0.001,0.002,0.003"], seeds=2, quick=True, base=base, out=tmp_path,
            client=client)))
        t.start()
        killed = None
        deadline = time.monotonic() + 60
        while killed is None and time.monotonic() < deadline:
            running = [p for p in tmp_path.glob("sweeps/*/cells/*/*/status")
                       if p.read_text().strip() == "running"]
            busy = [w for w, keys in client.processing().items() if keys]
            # kill only while every busy worker has a cell folder in progress: a worker between
            # cells (its last one done, the next not yet started) would leave nothing to rerun
            if busy and len(running) >= len(busy):
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.05)
        t.join(timeout=120)
        assert killed is not None and not t.is_alive()
    result = box["r"]
    assert len(result.cells) == 6 and not result.failed
    statuses = _statuses(result.path)
    # The killed cell left a folder stuck at "running"; its rerun finished: 6 done in all.
    assert statuses.count("done") == 6 and statuses.count("running") >= 1
    assert all(r["seeds_done"] == 2 for r in result.rows)


def test_sigkilled_driver_loses_no_finished_cell(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "neurothermo.cli", "sweep", NAME, "--quick", "--workers", "0",
           "--grid", "lr=0.001:0.006:6", "--out", str(tmp_path),
           *(a for b in TINY for a in ("--set", b))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before: list = []
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            idx = list(tmp_path.glob("sweeps/*/index.json"))
            if idx:
                cells = json.loads(idx[0].read_text())["cells"]
                before = [c["path"] for c in cells if c["status"] == "done"]
                if len(before) >= 2:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    folder = next(tmp_path.glob("sweeps/*"))
    done_on_disk = _statuses(folder).count("done")
    assert done_on_disk >= len(before) >= 2
    result = run_sweep(NAME, grid=["lr=0.001:0.006:6"], quick=True, base=TINY, out=tmp_path,
                       workers=0)
    assert result.path == folder and not result.failed
    kept = [e["path"] for e in result.cells if e.get("kept")]
    assert set(before) <= set(kept) and len(kept) == done_on_disk
    assert json.loads((folder / "index.json").read_text())["complete"]


def test_declared_sweep_and_failed_cells_rerun(tmp_path: Path, temp_experiment) -> None:
    def run(cfg, ctx) -> None:
        if cfg.scale > 1.5 and not (tmp_path / "fixed").exists():
            raise RuntimeError("boom")
        ctx.record(value=cfg.scale * (ctx.seed + 1))
        ctx.predict("value positive", cfg.scale * (ctx.seed + 1), 0.0, 0.0, sense="at_least")

    temp_experiment("toy-sweep", run, sweep=SweepPlan(grid=("scale=1,2",), seeds=3))
    first = run_sweep("toy-sweep", quick=True, out=tmp_path, workers=0)
    assert [e["status"] for e in first.cells] == ["done"] * 3 + ["failed"] * 3
    row = first.rows[0]
    assert row["figures"]["value"]["mean"] == pytest.approx(2.0)  # seeds 0, 1, 2 → 1, 2, 3
    assert row["figures"]["value"]["se"] == pytest.approx(1 / math.sqrt(3))
    assert row["predictions"]["value positive"]["fraction_passed"] == 1.0
    (tmp_path / "fixed").write_text("")
    second = run_sweep("toy-sweep", quick=True, out=tmp_path, workers=0)
    assert second.path == first.path and not second.failed
    assert [bool(e.get("kept")) for e in second.cells] == [True] * 3 + [False] * 3
    assert second.rows[1]["figures"]["value"]["mean"] == pytest.approx(4.0)


def test_cli_bad_grid_exits_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from neurothermo.cli import app

    res = CliRunner().invoke(app, ["sweep", NAME, "--grid", "lr=0.1", "--grid", "lr=0.2",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 2 and "'lr'" in res.output and "twice" in res.output
    assert not (tmp_path / "sweeps").exists()


def test_existing_scheduler(tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed")
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        result = run_sweep(NAME, grid=["lr=0.002,0.004"], quick=True, base=TINY,
                           out=tmp_path, scheduler=cluster.scheduler_address)
    assert len(result.cells) == 2 and not result.failed
    assert [r["seeds_done"] for r in result.rows] == [1, 1]
    assert all(r["predictions"][k]["se"] is None for r in result.rows for k in r["predictions"])
