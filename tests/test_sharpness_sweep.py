"""sharpness-phase's grid as a sweep: each cell alone gives bit for bit the numbers it gets in the
batched grid, and a run fed by the sweep's cells equals the run that simulates the grid itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from neurothermo.runner import ExperimentFailed, run_experiment
from neurothermo.sweep import run_sweep

NAME = "sharpness-phase"
# A tiny run (a few s CPU): short chains, one compared reading, a small η → 0 study.
BASE = ["steps=4000", "seeds=3", "compare=input", "compare_seeds=1", "probe_chains=4",
        "conv_lrs=0.04,0.06,0.09", "conv_steps=4000", "conv_chains=6", "check_samples=500"]
AXES = ["lr=0.3125,0.6875", "p=0.02,0.3"]
GRID = ["lrs=0.3125,0.6875", "ps=0.02,0.3"]


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_sweep_cells_equal_the_batched_grid_and_feed_the_run(tmp_path: Path) -> None:
    sweep = run_sweep(NAME, grid=AXES, seeds=1, quick=True, base=BASE, out=tmp_path / "s", workers=0)
    assert len(sweep.cells) == 4 and not sweep.failed
    batched = _summary(run_experiment(NAME, quick=True, out=tmp_path / "a",
                                      overrides=BASE + GRID).path)
    lrs, ps = batched["figures"]["lrs"], batched["figures"]["ps"]
    for e in sweep.cells:
        cell = _summary(sweep.path / e["path"])["figures"]["cell"]
        i, j = lrs.index(e["point"]["lr"]), ps.index(e["point"]["p"])
        # exact: the same random streams, the same per-chain arithmetic
        assert cell["eta_lambda"] == batched["figures"]["eta_lambda"][i][j]
    fed = _summary(run_experiment(NAME, quick=True, out=tmp_path / "b",
                                  overrides=BASE + GRID + [f"grid_from={sweep.path}"]).path)
    # Everything downstream of the grid (checks, figures, later random draws) is the same.
    assert fed["predictions"] == batched["predictions"]
    assert fed["figures"] == batched["figures"]
    # Not vacuous: another seed gives other numbers.
    other = _summary(run_experiment(NAME, quick=True, seed=1, out=tmp_path / "c",
                                    overrides=BASE + GRID).path)
    assert other["figures"]["eta_lambda"] != batched["figures"]["eta_lambda"]
    # A grid the sweep does not cover, or cells made with other settings, are refused by name.
    with pytest.raises(ExperimentFailed, match="no finished cell lr=0.5"):
        run_experiment(NAME, quick=True, out=tmp_path / "d",
                       overrides=[*BASE, "lrs=0.3125,0.5", "ps=0.02,0.3", f"grid_from={sweep.path}"])
    with pytest.raises(ExperimentFailed, match="steps"):
        run_experiment(NAME, quick=True, out=tmp_path / "d",
                       overrides=[*BASE, *GRID, "steps=3000", f"grid_from={sweep.path}"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["lr=0.5"], "'lr' and 'p'"),
    (["lr=0.5", "p=0.1", "grid_from=x"], "'grid_from'"),
])
def test_bad_cell_settings_name_the_setting(tmp_path: Path, overrides, message) -> None:
    from neurothermo.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match=message):
        run_experiment(NAME, quick=True, out=tmp_path, overrides=overrides)
    assert not (tmp_path / NAME).exists()
