from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neurothermo.runstore import (
    Run,
    RunStoreError,
    atomic_write_json,
    check_writable,
    dumps,
    environment,
    read_metrics,
    read_summary,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2, "t": torch.tensor([1.0, 2.0]), "n": np.float32(0.5)})
    assert json.loads(target.read_text()) == {"x": 2, "t": [1.0, 2.0], "n": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_non_finite_floats_stay_valid_json() -> None:
    assert json.loads(dumps({"a": float("nan"), "b": [float("inf")]})) == {"a": "nan", "b": ["inf"]}


def test_metrics_are_streamed_and_flushed(tmp_path: Path) -> None:
    run = Run.create(tmp_path, "toy", flush_seconds=0.0)
    assert run.status == "running"
    assert run.path.parent.name == "toy"
    run.log_metrics({"step": 0, "loss": 1.0})
    assert read_metrics(run.path) == [{"step": 0, "loss": 1.0}]  # flush_seconds=0: written at once
    slow = Run(run.path, flush_seconds=3600)
    slow.log_metrics({"step": 1, "loss": 0.5})
    assert len(read_metrics(run.path)) == 1  # buffered...
    slow.flush()
    assert [r["step"] for r in read_metrics(run.path)] == [0, 1]  # ...and appended, not overwritten
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_root_is_refused_before_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunStoreError, match="not writable.*--out"):
        check_writable(blocker / "runs")


def test_environment_and_missing_summary(tmp_path: Path) -> None:
    env = environment(seed=7)
    assert env["seed"] == 7 and env["torch"] == torch.__version__
    assert {"platform", "cpu_count"} <= set(env["machine"])
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        read_summary(tmp_path)
