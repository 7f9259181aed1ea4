"""The run folder contract: files, statuses, failures, interrupts, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neurothermo.config import ConfigError
from neurothermo.experiments.base import MissingExtra, UnknownExperiment
from neurothermo.runner import ExperimentFailed, run_experiment
from neurothermo.runstore import RunStoreError, read_metrics, read_status


def _random_walk(cfg, ctx) -> None:
    # draws from numpy's and torch's global generators, which the runner seeds from --seed
    x = float(np.random.rand())  # noqa: NPY002
    for step in range(cfg.steps):
        x += float(np.random.rand()) * cfg.scale + float(torch.rand(()))  # noqa: NPY002
        ctx.log(step, x=x)
    ctx.record(final=x)
    ctx.predict("x is positive", x, 0.0, 1e9)


def test_done_run_has_every_file(tmp_path: Path, temp_experiment) -> None:
    temp_experiment("toy-walk", _random_walk)
    res = run_experiment("toy-walk", quick=True, seed=3, out=tmp_path, overrides=["scale=2"])
    files = {p.name for p in res.path.iterdir()}
    assert {"config.json", "env.json", "metrics.jsonl", "summary.json", "status"} <= files
    assert read_status(res.path) == "done"
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["settings"] == {"steps": 3, "scale": 2.0} and cfg["preset"] == "quick"
    assert json.loads((res.path / "env.json").read_text())["seed"] == 3
    assert [r["step"] for r in read_metrics(res.path)] == [0, 1, 2]
    s = res.summary
    assert s["predictions"][0] | {"measured": None} == {
        "name": "x is positive", "measured": None, "predicted": 0.0, "tolerance": 1e9,
        "passed": True, "relative": False, "why": "", "sense": "equal", "control": False}
    assert res.path.parent == tmp_path / "toy-walk"


def test_same_seed_same_numbers(tmp_path: Path, temp_experiment) -> None:
    temp_experiment("toy-walk", _random_walk)
    a = run_experiment("toy-walk", seed=5, out=tmp_path).summary
    b = run_experiment("toy-walk", seed=5, out=tmp_path).summary
    c = run_experiment("toy-walk", seed=6, out=tmp_path).summary
    assert a["figures"] == b["figures"] and a["predictions"] == b["predictions"]
    assert a["figures"] != c["figures"]


def test_failure_leaves_traceback_and_status(tmp_path: Path, temp_experiment) -> None:
    def boom(cfg, ctx) -> None:
        ctx.log(0, loss=1.0)
        raise ValueError("the model exploded")

    temp_experiment("toy-boom", boom)
    with pytest.raises(ExperimentFailed, match="toy-boom failed: ValueError: the model exploded"):
        run_experiment("toy-boom", out=tmp_path)
    (run_dir,) = (tmp_path / "toy-boom").iterdir()
    assert read_status(run_dir) == "failed"
    assert "the model exploded" in (run_dir / "traceback.txt").read_text()
    assert read_metrics(run_dir) == [{"step": 0, "loss": 1.0}]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def test_interrupt_keeps_metrics_so_far(tmp_path: Path, temp_experiment) -> None:
    def interrupted(cfg, ctx) -> None:
        for step in range(cfg.steps):
            ctx.log(step, loss=1.0 / (step + 1))
            if step == 2:
                raise KeyboardInterrupt

    temp_experiment("toy-ctrl-c", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("toy-ctrl-c", out=tmp_path)
    (run_dir,) = (tmp_path / "toy-ctrl-c").iterdir()
    assert read_status(run_dir) == "interrupted"
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2]


def test_bad_input_is_refused_before_any_work(tmp_path: Path, temp_experiment) -> None:
    calls: list[int] = []
    temp_experiment("toy-count", lambda cfg, ctx: calls.append(1))
    with pytest.raises(UnknownExperiment, match="available: .*entropic-flow.*toy-count"):
        run_experiment("no-such-thing", out=tmp_path)
    with pytest.raises(ConfigError, match="valid keys: steps, scale"):
        run_experiment("toy-count", out=tmp_path, overrides=["stepz=1"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunStoreError, match="not writable"):
        run_experiment("toy-count", out=blocker / "sub")
    temp_experiment("toy-extra", lambda cfg, ctx: calls.append(1),
                    requires=("surely_not_installed_module",), extra="offline")
    with pytest.raises(MissingExtra, match=r'surely_not_installed_module.*pip install -e "\.\[offline\]"'):
        run_experiment("toy-extra", out=tmp_path)
    assert calls == []
    assert not (tmp_path / "toy-count").exists()


@pytest.mark.parametrize(
    ("measured", "predicted", "tol", "sense", "relative", "passed"),
    [
        (1.05, 1.0, 0.1, "equal", False, True),
        (1.2, 1.0, 0.1, "equal", False, False),
        (0.8, 1.0, 0.1, "equal", False, False),
        (0.8, 1.0, 0.1, "at_most", False, True),
        (1.2, 1.0, 0.1, "at_most", False, False),
        (1.2, 1.0, 0.1, "at_least", False, True),
        (0.8, 1.0, 0.1, "at_least", False, False),
        (105.0, 100.0, 0.1, "equal", True, True),     # relative: 10% of 100
        (115.0, 100.0, 0.1, "equal", True, False),
        (float("nan"), 1.0, 1e9, "equal", False, False),
        (float("inf"), 1.0, 1e9, "at_least", False, False),
    ],
)
def test_prediction_senses(measured, predicted, tol, sense, relative, passed) -> None:
    from neurothermo.experiments.base import Prediction

    p = Prediction.check("x", measured, predicted, tol, sense=sense, relative=relative)
    assert p.passed is passed


def test_prediction_rejects_meaningless_tolerances() -> None:
    from neurothermo.experiments.base import Prediction

    with pytest.raises(ValueError, match="tolerance must be finite"):
        Prediction.check("x", 1.0, 1.0, float("inf"))
    with pytest.raises(ValueError, match="sense must be one of"):
        Prediction.check("x", 1.0, 1.0, 0.1, sense="roughly")
