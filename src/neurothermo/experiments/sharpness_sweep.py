"""The (η × p) grid of ``sharpness-phase`` as a sweep: one cell per run, and the cells read back.

With the scalar settings ``lr`` and ``p`` a run of ``sharpness-phase`` simulates one cell of the
grid (its balanced-start chains, its sharper-start chains and the ``p = 1`` control chains of its
η) and records the cell's statistics as the figure ``cell``, with the grid checks on that one cell.
The experiment declares the grid ``lr × p`` of its presets as its sweep, so
``neurothermo sweep sharpness-phase`` runs the phase diagram cell by cell on dask, each cell an
ordinary run folder; the sweep table and heat maps aggregate them over seeds.

Every group of chains draws from its own random stream (:func:`sharpness_grid.cell_stream`, keyed
by the run's seed and the cell), so a cell alone gives bit for bit the numbers it gets inside the
batched grid. With ``grid_from=SWEEP_FOLDER`` the whole-experiment run reads its grid from such a
sweep instead of simulating it (what ``neurothermo reproduce --workers/--scheduler`` does): every
later check, figure and random draw is then the same as on the batched path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from neurothermo.experiments.sharpness_phase import SharpnessPhaseConfig

DT = torch.float64
# Per-cell statistics of ``run_grid`` (main grid, with the sharper start and the p = 1 control).
FLOAT_KEYS = ("lam", "se", "drift", "drift_se", "trq_star", "lam0", "lam_star", "start", "lr", "p",
              "sharp_drift", "sharp_drift_se", "sharp_lam", "sharp_se", "sharp_start", "ctrl_lam",
              "ctrl_se")
BOOL_KEYS = ("diverged", "sharp_present", "sharp_diverged")
# Settings a cell must share with the run that reads it (everything its chains depend on).
SHARED = ("reading", "k", "batch_size", "label_noise", "steps", "seeds", "hessian_every")


def cell_figure(grid: dict[str, Tensor]) -> dict[str, float]:
    """The statistics of a one-cell grid as plain floats (booleans as 0/1), and ``eta_lambda``.

    Example: ``ctx.record(cell=cell_figure(run_grid(one_cell_cfg, ctx, g, ..., seed=ctx.seed)))``.
    """
    out = {key: float(grid[key].reshape(-1)[0]) for key in FLOAT_KEYS}
    out.update({key: float(bool(grid[key].reshape(-1)[0])) for key in BOOL_KEYS})
    out["eta_lambda"] = out["lr"] * out["lam"]
    return out


class SweepCellsError(ValueError):
    """A sweep folder that cannot stand in for the in-run grid (missing cells, other settings)."""


def load_grid(cfg: SharpnessPhaseConfig, seed: int, folder: Path | str) -> dict[str, Tensor]:
    """The grid ``cfg.lrs × cfg.ps`` of seed ``seed`` from the finished cells of a sweep folder.

    Returns the same tensors as ``run_grid(..., sharp=True, seed=seed)`` (shape ``(len(lrs),
    len(ps))``).

    Example (what ``--set grid_from=runs/sweeps/sharpness-phase-<stamp>`` does in the run)::

        grid = load_grid(cfg, ctx.seed, cfg.grid_from)   # instead of run_grid(cfg, ctx, g, ...)

    Raises:
        SweepCellsError: no ``index.json``, a cell of the grid not finished in the folder, or a
            cell made with other settings (the error names the cell or setting, and the command that
            fills the folder).
    """
    folder = Path(folder)
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise SweepCellsError(f"setting 'grid_from' = {str(folder)!r}: not a sweep folder "
                              f"({type(exc).__name__}: {exc})") from None
    found: dict[tuple[float, float], dict[str, Any]] = {}
    for e in index.get("cells", []):
        pt = e.get("point", {})
        if e.get("status") != "done" or e.get("seed") != seed or set(pt) != {"lr", "p"}:
            continue
        run_dir = folder / e["path"]
        config = json.loads((run_dir / "config.json").read_text())["settings"]
        for key in SHARED:
            mine = getattr(cfg, key)
            if config.get(key) != (list(mine) if isinstance(mine, tuple) else mine):
                raise SweepCellsError(f"setting 'grid_from': cell lr={pt['lr']} p={pt['p']} of "
                                      f"{folder} has {key}={config.get(key)!r}, this run "
                                      f"{mine!r}; sweep with the same --set values")
        found[(float(pt["lr"]), float(pt["p"]))] = json.loads(
            (run_dir / "summary.json").read_text())["figures"]["cell"]
    missing = [(lr, p) for lr in cfg.lrs for p in cfg.ps if (float(lr), float(p)) not in found]
    if missing:
        lr, p = missing[0]
        raise SweepCellsError(
            f"setting 'grid_from': {folder} has no finished cell lr={lr!r} p={p!r} seed={seed} "
            f"({len(missing)} of {len(cfg.lrs) * len(cfg.ps)} missing); run `neurothermo sweep "
            "sharpness-phase --grid lr=… --grid p=… --seed SEED` into it first")
    shape = (len(cfg.lrs), len(cfg.ps))  # float() also reads "nan", how run folders store NaN
    out: dict[str, Tensor] = {}
    for key in FLOAT_KEYS:
        out[key] = torch.tensor([[float(found[(float(lr), float(p))][key]) for p in cfg.ps]
                                 for lr in cfg.lrs], dtype=DT).reshape(shape)
    for key in BOOL_KEYS:
        out[key] = torch.tensor([[float(found[(float(lr), float(p))][key]) > 0.5 for p in cfg.ps]
                                 for lr in cfg.lrs], dtype=torch.bool).reshape(shape)
    return out
