"""`sgd-vs-entropic-flow`: a tiny run keeps its predictions, and the check can fail."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neurothermo.experiments._common import loglog_slope
from neurothermo.runner import ExperimentFailed, run_experiment

TINY = ["hidden=8", "base_steps=4", "n_lr=3", "substeps=1", "n_curvature_batches=1"]


def test_slope_fit_recovers_a_power_law() -> None:
    x = np.array([0.1, 0.05, 0.025, 0.0125])
    slope, se = loglog_slope(x, 3.0 * x**2)
    assert slope == pytest.approx(2.0, abs=1e-12) and se < 1e-10


def test_tiny_run_keeps_its_predictions(tmp_path: Path) -> None:
    res = run_experiment("sgd-vs-entropic-flow", quick=True, out=tmp_path, overrides=TINY)
    preds = res.summary["predictions"]
    assert len(preds) == 2 and all(p["passed"] for p in preds), preds
    fig = res.summary["figures"]
    plain, entropic = np.array(fig["distance_plain"]), np.array(fig["distance_entropic"])
    assert len(plain) == 3 and np.all(np.diff(plain) < 0) and np.all(np.diff(entropic) < 0)
    assert np.all(entropic < plain)
    assert (res.path / "sgd_vs_entropic_flow.png").stat().st_size > 10_000
    lines = (res.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 + 8 + 16  # one record per SGD step of every learning rate
    assert {"distance_plain", "distance_entropic", "lr", "time"} <= set(json.loads(lines[-1]))


@pytest.mark.parametrize("scale", ["0", "2"])
def test_a_wrong_entropic_term_fails_the_check(tmp_path: Path, scale: str) -> None:
    """Control: without the term (0) or with a factor-2 slip (2) the distance is O(η), not O(η²)."""
    res = run_experiment("sgd-vs-entropic-flow", quick=True, out=tmp_path,
                         overrides=[*TINY, f"entropic_scale={scale}"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    entropic = next(p for name, p in preds.items() if "entropic" in name)
    assert not entropic["passed"] and abs(entropic["measured"] - 1.0) < 0.2


def test_a_learning_rate_too_large_for_the_slope_test_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExperimentFailed, match="too large for the slope test"):
        run_experiment("sgd-vs-entropic-flow", quick=True, out=tmp_path,
                       overrides=[*TINY, "lr_max=0.5"])
