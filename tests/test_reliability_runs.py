"""Failures leave a true record, untrusted run folders are read safely (run store, runner, CLI).

Signals and a full disk are real: the runs happen in a subprocess that gets SIGTERM / SIGHUP, or
runs under a small file-size limit (``RLIMIT_FSIZE``; Python ignores SIGXFSZ, so the write raises
``OSError(EFBIG)`` as on a full disk).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neurothermo.cli import app
from neurothermo.config import ConfigError, apply_overrides, validate_config
from neurothermo.experiments.base import get_experiment
from neurothermo.runner import run_experiment
from neurothermo.runstore import Run, RunReadError, read_metrics, read_status, read_summary

cli = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")

# A toy experiment in a child process: logs a record every few ms (fat records, so a small
# file-size limit is hit), writes "started" to a marker file once metrics are on disk.
CHILD = textwrap.dedent("""
    import sys, time, resource
    OUT, MARKER = sys.argv[1], sys.argv[2]
    from dataclasses import dataclass
    from neurothermo.config import setting
    from neurothermo.experiments.base import Experiment, register, get_experiment
    get_experiment("entropic-flow")

    @dataclass(frozen=True)
    class Cfg:
        steps: int = setting(10**6, "steps", min=1)

    def run(cfg, ctx):
        for step in range(cfg.steps):
            ctx.log(step, pad="x" * 200)
            if step == 50:
                ctx.run.flush()
                open(MARKER, "w").write("started")
            time.sleep(0.002)

    register(Experiment(name="toy-slow", title="slow", config=Cfg, quick=Cfg(), full=Cfg(), run=run))
    if len(sys.argv) > 3:  # the file-size limit, in bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
    sys.argv = ["neurothermo", "run", "toy-slow", "--out", OUT]
    from neurothermo.cli import main
    main()
""")


def _child(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    marker = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "runs"), str(marker),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    return proc, marker


def _wait_for(marker: Path, proc: subprocess.Popen[str], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "child never started"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_leave_interrupted_with_metrics(tmp_path: Path, sig: int) -> None:
    proc, marker = _child(tmp_path)
    _wait_for(marker, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, out  # 143 for SIGTERM, as a shell reports it
    (run_dir,) = (tmp_path / "runs" / "toy-slow").iterdir()
    assert read_status(run_dir) == "interrupted"
    assert read_summary(run_dir)["status"] == "interrupted"
    assert len(read_metrics(run_dir)) > 50  # every record logged before the signal
    assert "interrupted" in out


@pytest.mark.slow
def test_full_disk_leaves_a_failure_record_naming_the_disk(tmp_path: Path) -> None:
    proc, _ = _child(tmp_path, str(64 * 1024))  # 64 KiB per file: metrics.jsonl hits it
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    (run_dir,) = (tmp_path / "runs" / "toy-slow").iterdir()
    assert read_status(run_dir) == "failed"
    assert "no room to write" in " ".join(out.split())
    assert "File too large" in (run_dir / "traceback.txt").read_text()
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "no room to write" in summary["reason"]
    raw = (run_dir / "metrics.jsonl").read_bytes()
    assert raw.endswith(b"\n")  # the failed append was rolled back to the last complete line
    assert all(json.loads(line) for line in raw.splitlines())


def test_huge_seed_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to .*2\*\*63"):
        run_experiment("entropic-flow", quick=True, seed=10**23, out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    res = cli.invoke(app, ["run", "entropic-flow", "--seed", "99999999999999999999999",
                           "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2 and not (tmp_path / "runs").exists()


def test_failure_after_the_folder_exists_ends_failed(tmp_path: Path, monkeypatch) -> None:
    import neurothermo.runner as runner

    def broken(seed: int) -> dict[str, object]:
        raise RuntimeError("environment probe broke")

    monkeypatch.setattr(runner, "environment", broken)
    with pytest.raises(runner.ExperimentFailed, match="environment probe broke"):
        run_experiment("entropic-flow", quick=True, out=tmp_path)
    (run_dir,) = (tmp_path / "entropic-flow").iterdir()
    assert read_status(run_dir) == "failed" and (run_dir / "traceback.txt").exists()


@pytest.mark.parametrize(("name", "key"), [("entropic-flow", "x0"), ("layer-balance", "lr"),
                                           ("layer-balance", "window"),
                                           ("layer-balance", "init_scale")])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_settings_are_refused(name: str, key: str, value: str) -> None:
    exp = get_experiment(name)
    with pytest.raises(ConfigError, match=f"'{key}'.*must be a finite number"):
        apply_overrides(validate_config(exp.quick), [f"{key}={value}"])


def test_overlong_path_setting_names_the_key() -> None:
    exp = get_experiment("layer-balance")
    with pytest.raises(ConfigError, match="'mnist_dir'.*File name too long"):
        apply_overrides(validate_config(exp.quick), ["mnist_dir=" + "a" * 5000])


def test_empty_out_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = cli.invoke(app, ["run", "entropic-flow", "--quick", "--out", ""])
    assert res.exit_code == 2 and "output folder is empty" in res.output
    res = cli.invoke(app, ["reproduce", "--quick", "--out", ""])
    assert res.exit_code == 2 and "output folder is empty" in res.output
    assert list(tmp_path.iterdir()) == []


def _run_dir(tmp_path: Path, summary: bytes) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "status").write_text("done\n")
    (d / "summary.json").write_bytes(summary)
    return d


GOOD = {"experiment": "x", "status": "done", "predictions": [
    {"name": "p", "measured": 1.0, "predicted": 1.0, "tolerance": 0.1, "passed": True}]}


@pytest.mark.parametrize(("content", "why"), [
    (json.dumps(GOOD)[:40].encode(), "not valid JSON"),
    (b"[1, 2, 3]", "holds a JSON list"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
    (json.dumps({**GOOD, "predictions": [{"name": "p", "measured": 1, "predicted": 1,
                                          "passed": True}]}).encode(), "has no tolerance"),
    (json.dumps({**GOOD, "predictions": {"a": 1}}).encode(), "not a list"),
])
def test_show_on_damaged_folders_says_why(tmp_path: Path, content: bytes, why: str) -> None:
    d = _run_dir(tmp_path, content)
    with pytest.raises(RunReadError, match="not a readable run"):
        read_summary(d)
    res = cli.invoke(app, ["show", str(d)])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "not a readable run" in text and why in text and "Traceback" not in text


def test_show_escapes_markup_and_terminal_sequences(tmp_path: Path) -> None:
    evil = {**GOOD, "experiment": "\x1b]0;pwned\x07x", "predictions": [
        {"name": "[bold red]fake[/] \x1b[2J", "measured": 1.0, "predicted": 1.0,
         "tolerance": 0.1, "passed": False}],
        "figures": {"a[/]": "[link=file:///etc]x[/link]", "b": "\x9b31m"}, "reason": "\x1b[31m"}
    d = _run_dir(tmp_path, json.dumps(evil).encode())
    res = cli.invoke(app, ["show", str(d)])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x9b" not in res.output and "\x07" not in res.output
    flat = "".join(res.output.split())
    assert "[boldred]fake[/]" in flat and "a[/]" in flat and "\\x1b[2J" in flat


def test_metrics_flush_appends_only_new_lines_and_rolls_back_a_failed_write(
        tmp_path: Path, monkeypatch) -> None:
    run = Run.create(tmp_path, "toy", flush_seconds=3600)
    for i in range(3):
        run.log_metrics({"step": i})
    run.flush()
    target = run.path / "metrics.jsonl"
    inode, size = target.stat().st_ino, target.stat().st_size
    run.log_metrics({"step": 3})
    run.flush()
    assert target.stat().st_ino == inode  # appended in place: the old lines are not copied
    assert target.stat().st_size == size + len(b'{"step": 3}\n')

    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:  # the disk fills up mid-write
        if len(data) > 8:
            real_write(fd, bytes(data[:8]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    run.log_metrics({"step": 4, "pad": "x" * 100})
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        run.flush()
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(run.path)] == [0, 1, 2, 3]  # no torn line left
    run.flush()  # the record stayed pending and goes out once there is room
    assert [r["step"] for r in read_metrics(run.path)] == [0, 1, 2, 3, 4]


def test_read_metrics_skips_a_torn_last_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"ste')
    assert read_metrics(tmp_path) == [{"step": 0}, {"step": 1}]
