"""The command line: every command, and each bad input as a one-line error with a non-zero exit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neurothermo import __version__
from neurothermo.cli import app
from neurothermo.runstore import read_status

runner = CliRunner()


def _only(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Restrict the registry seen by `reproduce` to the named experiments."""
    from neurothermo.experiments import base

    keep = {n: base.REGISTRY[n] for n in names}
    monkeypatch.setattr(base, "REGISTRY", keep)


def test_version_and_list() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and "entropic-flow" in res.output


def test_run_writes_folder_and_show_reads_it(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", "entropic-flow", "--quick", "--seed", "1", "--out",
                              str(tmp_path), "--set", "n_lr=3", "--set", "figure_steps=2"])
    assert res.exit_code == 0, res.output
    (run_dir,) = (tmp_path / "entropic-flow").iterdir()
    assert read_status(run_dir) == "done"
    assert {"config.json", "env.json", "metrics.jsonl", "summary.json", "status",
            "entropic_flow.png"} <= {p.name for p in run_dir.iterdir()}
    assert json.loads((run_dir / "config.json").read_text())["settings"]["n_lr"] == 3
    res = runner.invoke(app, ["show", str(run_dir)])
    assert res.exit_code == 0 and "slope corrected" in res.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run", "nope"], 2, "unknown experiment 'nope'; available: "),
        (["run", "entropic-flow", "--set", "bogus=1"], 2, "valid keys: loss, x0"),
        (["run", "entropic-flow", "--set", "n_steps=two"], 2, "'n_steps': cannot read 'two' as int"),
        (["run", "entropic-flow", "--set", "n_steps=1"], 2, "'n_steps'=1: must be >= 2"),
        (["run", "entropic-flow", "--set", "lr_min=0.5"], 2, "lr_min (0.5) must be < lr_max"),
        (["show", "."], 2, "no summary.json"),
        (["describe", "nope"], 1, "unknown experiment"),
    ],
)
def test_bad_input_one_line_errors(args: list[str], code: int, message: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == code
    assert message in " ".join(res.output.split())


def test_unwritable_out_fails_before_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args in (["run", "entropic-flow", "--quick"], ["reproduce", "--quick"]):
        res = runner.invoke(app, [*args, "--out", str(blocker / "runs")])
        assert res.exit_code == 2 and "not writable" in res.output


def test_failing_experiment_exits_nonzero_with_reason(tmp_path: Path, temp_experiment) -> None:
    def boom(cfg, ctx) -> None:
        raise RuntimeError("diverged at step 3")

    temp_experiment("toy-boom", boom)
    res = runner.invoke(app, ["run", "toy-boom", "--out", str(tmp_path)])
    assert res.exit_code == 1
    assert "toy-boom failed: RuntimeError: diverged at step 3" in " ".join(res.output.split())
    (run_dir,) = (tmp_path / "toy-boom").iterdir()
    assert read_status(run_dir) == "failed" and (run_dir / "traceback.txt").exists()


def test_reproduce_runs_all_skips_missing_extras_and_reports_failures(
    tmp_path: Path, temp_experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp_experiment("toy-ok", lambda cfg, ctx: ctx.predict("one is one", 1.0, 1.0, 0.0))
    temp_experiment("toy-extra", lambda cfg, ctx: None, requires=("surely_not_installed",),
                    extra="offline")
    _only(monkeypatch, "toy-ok", "toy-extra")
    res = runner.invoke(app, ["reproduce", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "1/1 predictions hold" in out and "needs extra 'offline'" in out

    temp_experiment("toy-bad", lambda cfg, ctx: 1 / 0)
    _only(monkeypatch, "toy-ok", "toy-bad")
    res = runner.invoke(app, ["reproduce", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "failed" in res.output
    assert read_status(next((tmp_path / "toy-ok").iterdir())) == "done"
