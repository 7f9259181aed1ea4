"""``sharpness-phase``: sharpening toward the noise-balanced minimum, capped by the edge of stability.

The 2-2-2 linear network of :mod:`neurothermo.experiments.sharpness_model` (``f = W₂W₁x``,
``y = x + ε``, loss ``K‖f − y‖²``; ``K = ½`` is torch's ``nn.MSELoss()`` over the 2 outputs, mean
over the batch of ``b`` fresh samples per step). Every minimum is at least as sharp as the balanced
start ``W₁ = W₂ = I`` (``λ₀ = 4K·max_l s_l``); gradient noise pushes SGD along the minimum manifold to
the noise-balanced point of sharpness ``λ*(p)``, from either side; where ``η·λ* > 2`` it cannot settle
and ``η·λ_max`` hovers near 2.

Checks (each with a control run inside the experiment, or a setting that switches its cause off;
details and measured numbers in ``docs/experiments/sharpness-phase.md``):

* exact: ``λ₀`` and ``λ*`` against the dense Hessian; zero expected charge change at the balanced
  point; the charge identity ``ΔQ = η²(g₁g₁ᵀ − g₂ᵀg₂)`` along a run (round-off only).
* grid at the paper's ``η`` (both starts in one batched simulation): in every stable cell the mean charge
  moves toward the noise-balanced ``Q*`` (sharpening) from the balanced start, ``λ_max`` falls from a
  start sharper than ``λ*`` (flattening), both reach one stationary sharpness; no cell settles above
  ``η·λ_max = 2``; no cell with a stable start diverges. Control chains on balanced data (``p = 1``)
  measure how much fluctuations alone lift the time-averaged ``λ_max``.
* probes: time series from both starts; without label noise nothing moves (exact).
* ``η → 0``: the stationary sharpness from the balanced start tends to ``λ*`` (fit intercept) with a
  gap linear in ``η`` (fitted log-log slope).

The grid is also a declared sweep: ``--set lr=… p=…`` runs one cell, and ``grid_from`` reads the
cells back, with the same numbers as the batched grid (:mod:`.sharpness_sweep`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from neurothermo.config import setting
from neurothermo.experiments import sharpness_model as sm
from neurothermo.experiments.base import Experiment, RunContext, SweepPlan, register
from neurothermo.experiments.sharpness_grid import run_grid
from neurothermo.experiments.sharpness_sweep import cell_figure, load_grid

lambda_star = sm.lambda_star  # the closed form lives in sharpness_model; kept here for old imports


PAPER_LRS = tuple(round(0.3125 + 0.025 * i, 4) for i in range(16))
PAPER_PS = tuple(float(f"{0.007 * (0.39 / 0.007) ** (i / 26):.3g}") for i in range(27))


@dataclass(frozen=True)
class SharpnessPhaseConfig:
    lrs: tuple[float, ...] = setting(PAPER_LRS, "learning rates η (x axis)", min=1e-4, max=2.0)
    ps: tuple[float, ...] = setting(PAPER_PS, "data balance p (y axis), each in (0, 1]")
    reading: str = setting("label", "what p scales: label-noise variance, input variance, or both",
                           choices=sm.READINGS)
    k: float = setting(0.5, "MSE factor K in K‖f − y‖² (½: nn.MSELoss over 2 outputs)", min=1e-3, max=10)
    batch_size: int = setting(64, "batch size b, fresh samples each step (0: full batch = GD)",
                              min=0, max=1 << 20)
    label_noise: float = setting(1.0, "scale of the label-noise variances (0: no label noise)", min=0.0)
    steps: int = setting(30_000, "SGD steps per chain (grid and probes)", min=100)
    seeds: int = setting(4, "independent chains per grid cell (averaged)", min=2, max=256)
    hessian_every: int = setting(100, "steps between exact sharpness readings", min=1)
    compare: tuple[str, ...] = setting(("input", "both", "k1", "b1"),
                                       "other readings of 'data balance' run on the same grid "
                                       "(input, both, k1: K = 1, b1: batch 1, label: the default)")
    compare_seeds: int = setting(2, "chains per cell for the compared readings", min=1, max=64)
    probe_lrs: tuple[float, ...] = setting((0.3, 0.5), "η of the probe runs (time series, controls)")
    probe_ps: tuple[float, ...] = setting((0.1, 0.3), "p of the probe runs (paired with probe_lrs)")
    probe_chains: int = setting(16, "chains per probe and start", min=2, max=1024)
    charge_steps: int = setting(300, "steps over which the exact charge identity is checked", min=1)
    conv_lrs: tuple[float, ...] = setting((0.02, 0.03, 0.05, 0.08, 0.12),
                                          "small η for the η → 0 convergence to λ*", min=1e-4, max=1.0)
    conv_p: float = setting(0.25, "p of the η → 0 study")
    conv_batch: int = setting(4, "batch size of the η → 0 study", min=1)
    conv_steps: int = setting(150_000, "steps of the η → 0 study (≫ relaxation time at the smallest η)",
                              min=100)
    conv_chains: int = setting(64, "chains per η in the η → 0 study", min=3, max=1024)
    check_samples: int = setting(20_000, "fixed sample for the Lanczos cross-check", min=100)
    lr: float = setting(0.0, "one η: with p, run only the grid cell (lr, p), a sweep cell "
                             "(0: the whole experiment)", min=0.0, max=2.0)
    p: float = setting(0.0, "one data balance p, paired with lr (0: the whole experiment)",
                       min=0.0, max=1.0)
    grid_from: str = setting("", "a sweep folder whose finished cells (lr × p, this seed) replace "
                                 "the in-run grid (what reproduce --workers/--scheduler sets)")

    def check(self) -> None:
        """Cross-field checks (run by the config validation); ``ValueError`` names the setting."""
        for name in ("ps", "probe_ps"):
            for p in getattr(self, name):
                sm.check_balance(p, name)
        sm.check_balance(self.conv_p, "conv_p")
        if len(self.probe_lrs) != len(self.probe_ps):
            raise ValueError("settings 'probe_lrs' and 'probe_ps' pair up: give them the same length")
        unknown = set(self.compare) - {"label", "input", "both", "k1", "b1"}
        if unknown:
            raise ValueError(f"setting 'compare': unknown readings {sorted(unknown)}; "
                             "choose from label, input, both, k1, b1")
        if (self.lr > 0) != (self.p > 0):
            raise ValueError("settings 'lr' and 'p' pick one grid cell together: give both "
                             "(e.g. --set lr=0.5 --set p=0.1) or neither")
        if self.p > 0:
            sm.check_balance(self.p, "p")
            if self.grid_from:
                raise ValueError("setting 'grid_from' reads a whole grid; it cannot be combined "
                                 "with one cell (lr, p)")
        if len(self.conv_lrs) < 3:
            raise ValueError("setting 'conv_lrs' needs at least 3 learning rates to fit the gap's scaling")


def run(cfg: SharpnessPhaseConfig, ctx: RunContext) -> None:
    from neurothermo.experiments import sharpness_checks as chk
    from neurothermo.experiments.sharpness_figures import phase_figure, series_figure

    cfg.check()
    g = torch.Generator().manual_seed(ctx.seed)
    if cfg.lr > 0:  # one cell of the grid (a sweep cell): its statistics and checks, nothing else
        one = replace(cfg, lrs=(cfg.lr,), ps=(cfg.p,))
        cell = run_grid(one, ctx, g, reading=cfg.reading, k=cfg.k, batch=cfg.batch_size,
                        seeds=cfg.seeds, sharp=True, seed=ctx.seed)
        ctx.record(cell=cell_figure(cell))
        chk.grid_checks(one, ctx, cell)
        return
    chk.exact_checks(cfg, ctx)
    if cfg.grid_from:  # the grid's cells were run as a sweep (on dask): the same numbers, read back
        grid = load_grid(cfg, ctx.seed, cfg.grid_from)
    else:
        grid = run_grid(cfg, ctx, g, reading=cfg.reading, k=cfg.k, batch=cfg.batch_size,
                        seeds=cfg.seeds, sharp=True, seed=ctx.seed)
    chk.grid_checks(cfg, ctx, grid)
    probes = chk.probe_runs(cfg, ctx, g)
    conv = chk.convergence(cfg, ctx, g)
    others = {}
    for name in cfg.compare:
        reading, k, b = {"label": ("label", 0.5, cfg.batch_size), "input": ("input", 0.5, cfg.batch_size),
                         "both": ("both", 0.5, cfg.batch_size), "k1": ("label", 1.0, cfg.batch_size),
                         "b1": ("label", 0.5, 1)}[name]
        others[name] = run_grid(cfg, ctx, g, reading=reading, k=k, batch=b, seeds=cfg.compare_seeds,
                                label=name)
    chk.compare_readings(cfg, ctx, grid, others)
    chk.cross_check(cfg, ctx, g)
    phase_figure(cfg, ctx, grid, others)
    series_figure(cfg, ctx, probes, conv)


def _axes(lrs: tuple[float, ...], ps: tuple[float, ...]) -> tuple[str, ...]:
    return (f"lr={','.join(map(repr, lrs))}", f"p={','.join(map(repr, ps))}")


QUICK = SharpnessPhaseConfig(
    lrs=(0.3125, 0.4375, 0.5625, 0.6875), ps=(0.01, 0.03, 0.1, 0.3), steps=20_000, seeds=4,
    compare=("input", "k1"), compare_seeds=2, probe_chains=8, conv_lrs=(0.03, 0.045, 0.07, 0.1),
    conv_steps=70_000, conv_chains=48, check_samples=5000)

EXPERIMENT = register(
    Experiment(
        name="sharpness-phase",
        title="SGD sharpens (or flattens) toward the noise-balanced λ*(p), capped at 2/η (Figs. 5–6)",
        config=SharpnessPhaseConfig,
        quick=QUICK,
        full=SharpnessPhaseConfig(),
        run=run,
        cost="full: 16 η × 27 p × 4 seeds from both starts, 4 other readings, probes, η → 0 study: "
             "≈ 165 s CPU on one core",
        # `neurothermo sweep sharpness-phase`: the phase diagram cell by cell (each cell a run with
        # --set lr=… p=…); `reproduce --workers/--scheduler` feeds it to the main run (grid_from).
        sweep=SweepPlan(grid=_axes(PAPER_LRS, PAPER_PS), seeds=1,
                        quick_grid=_axes(QUICK.lrs, QUICK.ps), feeds="grid_from"),
    )
)
