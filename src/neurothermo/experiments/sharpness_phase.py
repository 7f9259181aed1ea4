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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.config import setting
from neurothermo.experiments import sharpness_model as sm
from neurothermo.experiments.base import Experiment, RunContext, register

lambda_star = sm.lambda_star  # the closed form lives in sharpness_model; kept here for old imports

DT = torch.float64
Z = 3.0  # z-score for statistical checks: chains are independent, so 3 standard errors ≈ 0.3 % two-sided

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
        if len(self.conv_lrs) < 3:
            raise ValueError("setting 'conv_lrs' needs at least 3 learning rates to fit the gap's scaling")


def _cells(lrs: tuple[float, ...], ps: tuple[float, ...], seeds: int, reading: str, k: float,
           noise: float) -> dict[str, Tensor]:
    """Per-chain tensors for a (η × p × seed) grid: lr, p, k, sx, se, λ₀, λ*."""
    E = torch.tensor(lrs, dtype=DT).repeat_interleave(len(ps) * seeds)
    P = torch.tensor(ps, dtype=DT).repeat_interleave(seeds).repeat(len(lrs))
    cov = [sm.covariances(float(p), reading) for p in ps]
    sx = torch.tensor([c[0] for c in cov], dtype=DT).repeat_interleave(seeds, 0).repeat(len(lrs), 1)
    se = torch.tensor([c[1] for c in cov], dtype=DT).repeat_interleave(seeds, 0).repeat(len(lrs), 1)
    kk = torch.full_like(E, k)
    lam_star = sm.equilibrium_sharpness(sx, se, kk)          # noise scale does not move the balance
    return {"lr": E, "p": P, "k": kk, "sx": sx, "se": se * noise, "lam0": sm.start_sharpness(sx, kk), "lam_star": lam_star}


def sharp_start(lam_target: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``W₁ = diag(1, c)``, ``W₂ = diag(1, 1/c)``, ``c < 1``: a minimum of sharpness ``2K(1 + c⁻²)`` = target.

    (For ``Σ_x = diag(1, s₂ ≤ 1)`` the top pair is (output 2, input 1), so the formula holds for every
    reading.) ``lam_target > 4K`` is required.
    """
    c = (lam_target / (2 * k) - 1) ** -0.5
    one = torch.ones_like(c)
    return torch.diag_embed(torch.stack([one, c], 1)), torch.diag_embed(torch.stack([one, 1 / c], 1))


def _starts(cells: dict[str, Tensor], start: str) -> tuple[Tensor, Tensor]:
    C = cells["lr"].shape[0]
    if start == "balanced":
        eye = torch.eye(2, dtype=DT).repeat(C, 1, 1)
        return eye, eye.clone()
    # halfway between λ* and the stability limit 2/η (or 1.5·λ* when that is unstable anyway)
    target = torch.where(cells["lr"] * cells["lam_star"] < 2,
                         (cells["lam_star"] + 2 / cells["lr"]) / 2, 1.5 * cells["lam_star"])
    return sharp_start(target, cells["k"])


def stationary(readings: Tensor) -> tuple[Tensor, Tensor]:
    """Per-chain time average over the second half of the readings, and NaN-marked divergence."""
    late = readings[readings.shape[0] // 2:]
    return late.mean(0), torch.isnan(readings).any(0)


def cell_stats(per_chain: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Average over the seeds of each cell (last axis) excluding diverged chains.

    Returns ``(mean, standard error, diverged)`` of shape ``shape``; a cell counts as diverged when any
    of its chains diverged (its mean is still NaN-free if others survive, but it is masked in figures
    and checks). Standard error: seed-to-seed spread / √n (independent chains).
    """
    x = per_chain.reshape(*shape, -1)
    n = (~torch.isnan(x)).sum(-1)
    mean = x.nanmean(-1)
    var = ((x - mean[..., None]) ** 2).nansum(-1) / (n - 1).clamp(min=1)
    se = (var / n.clamp(min=1)).sqrt()
    diverged = n < x.shape[-1]
    nan = torch.full_like(mean, float("nan"))
    return torch.where(diverged, nan, mean), torch.where(diverged, nan, se), diverged


def run_grid(cfg: SharpnessPhaseConfig, ctx: RunContext, g: torch.Generator, *, reading: str, k: float,
             batch: int, seeds: int, sharp: bool = False, label: str = "grid") -> dict[str, Tensor]:
    """All (η, p, seed) chains of one reading as one batched simulation; per-cell statistics.

    With ``sharp``, the same tensor also carries, for every cell with ``η·λ* < 2``, chains started
    sharper than λ* (keys ``sharp_*``; NaN where absent or diverged), and for every η control chains on
    balanced data ``p = 1`` (keys ``ctrl_*``): there λ* = λ₀, so their time-averaged λ_max measures the
    upward bias that fluctuations alone give a top eigenvalue (Jensen: λ_max is convex).
    """
    cells = _cells(cfg.lrs, cfg.ps, seeds, reading, k, cfg.label_noise)
    C = cells["lr"].shape[0]
    W1, W2 = _starts(cells, "balanced")
    idx = torch.nonzero(cells["lr"] * cells["lam_star"] < 2).flatten() if sharp else torch.zeros(0, dtype=torch.long)
    sub = {key: v[idx] for key, v in cells.items()}
    S1, S2 = _starts(sub, "sharp")
    # control chains: balanced data (p = 1) at every η: what fluctuations alone do to λ_max
    ctrl = _cells(cfg.lrs, (1.0,), seeds, reading, k, cfg.label_noise) if sharp else {
        key: v[:0] for key, v in cells.items()}
    C1, C2 = _starts(ctrl, "balanced")
    n_sub = len(idx)
    run_cells = {key: torch.cat([v, sub[key], ctrl[key]]) for key, v in cells.items()}
    W1, W2 = torch.cat([W1, S1, C1]), torch.cat([W2, S2, C2])
    lam_start = sm.sharpness(W1, W2, run_cells["sx"], run_cells["k"])
    with ctx.progress(f"SGD on the (η, p) grid: {label}", cfg.steps) as advance:
        lam, Q, *_ = sm.simulate(W1, W2, lr=run_cells["lr"], k=run_cells["k"], sx=run_cells["sx"],
                              se=run_cells["se"], batch=batch, steps=cfg.steps, every=cfg.hessian_every,
                              generator=g, advance=advance)
    per_chain, _ = stationary(lam)
    shape = (len(cfg.lrs), len(cfg.ps))
    mean, se, div = cell_stats(per_chain[:C], shape)
    drift = charge_drift(Q, W1, W2, run_cells)
    first = slice(None, None, seeds)
    d_mean, d_se, _ = cell_stats(drift[:C], shape)
    a2 = sm.equilibrium_scales(cells["sx"], cells["se"].clamp(min=1e-300)) ** 2
    trq_star = (a2 - 1 / a2).sum(1)[first].reshape(shape)
    out = {"lam": mean, "se": se, "diverged": div, "drift": d_mean, "drift_se": d_se, "trq_star": trq_star,
           "lam0": cells["lam0"][first].reshape(shape), "lam_star": cells["lam_star"][first].reshape(shape),
           "start": lam_start[:C][first].reshape(shape), "lr": cells["lr"][first].reshape(shape),
           "p": cells["p"][first].reshape(shape)}
    if sharp:
        full = torch.full((C,), float("nan"), dtype=DT)
        present = torch.zeros(C, dtype=torch.bool)
        present[idx] = True
        chains, starts, drifts = full.clone(), full.clone(), full.clone()
        chains[idx], starts[idx] = per_chain[C:C + n_sub], lam_start[C:C + n_sub]
        drifts[idx] = drift[C:C + n_sub]
        dm, ds, _ = cell_stats(drifts, shape)
        out.update(sharp_drift=dm, sharp_drift_se=ds)
        m, s, _ = cell_stats(chains, shape)
        has = present.reshape(*shape, -1).all(-1)
        out.update(sharp_lam=m, sharp_se=s, sharp_start=starts[first].reshape(shape), sharp_present=has,
                   sharp_diverged=has & torch.isnan(m))
        cm, cs, _ = cell_stats(per_chain[C + n_sub:], (len(cfg.lrs), 1))
        out.update(ctrl_lam=cm.expand(shape), ctrl_se=cs.expand(shape))
    return out


def charge_drift(Q: Tensor, W1: Tensor, W2: Tensor, cells: dict[str, Tensor]) -> Tensor:
    """Per chain: how far the second-half mean of ``Tr Q = ‖W₁‖² − ‖W₂‖²`` moved toward its
    noise-balanced value, ``d = (Tr Q̄ − Tr Q_start)·sign(Tr Q*)`` with ``Tr Q* = Σ_l (a_l² − a_l⁻²)``.

    ``Tr Q`` is linear in ``Q`` (fluctuations do not bias its mean, unlike ``λ_max``, a convex function
    of the weights) and invariant under the hidden-unit rotations ``W₁ → OW₁, W₂ → W₂Oᵀ`` along which
    the iterates diffuse freely. ``W1, W2`` are the starts; NaN for diverged chains.
    """
    a2 = sm.equilibrium_scales(cells["sx"], cells["se"].clamp(min=1e-300)) ** 2
    target = (a2 - 1 / a2).sum(1)
    late = Q[Q.shape[0] // 2:].mean(0).diagonal(dim1=-2, dim2=-1).sum(-1)
    start = sm.charge(W1, W2).diagonal(dim1=-2, dim2=-1).sum(-1)
    return (late - start) * torch.sign(target)


def picture_metrics(res: dict[str, Tensor]) -> dict[str, float]:
    """Numbers that compare a grid with the paper's phase diagram (colour 0.6 … 2.0, ≈ 2 below p = η²/2).

    ``min``/``max`` of ``η·λ_max`` over converged cells; ``saturated_below_curve``: fraction of cells with
    ``p < η²/2`` whose ``η·λ_max ≥ 1.8``; ``onset_ratio``: median over ``η`` of (largest ``p`` with
    ``η·λ_max ≥ 1.9``) / (η²/2) (NaN if no cell saturates); ``diverged``: fraction of diverged cells;
    ``distance``: ``|min − 0.6| + |max − 2| + (1 − saturated_below_curve) + diverged``, smaller is closer.
    """
    v = res["lr"] * res["lam"]
    ok = ~res["diverged"]
    if not bool(ok.any()):
        return {"min": math.nan, "max": math.nan, "saturated_below_curve": 0.0, "onset_ratio": math.nan,
                    "diverged": 1.0, "distance": math.inf}
    below = (res["p"] < res["lr"] ** 2 / 2) & ok
    sat = float(((v >= 1.8) & below).sum() / below.sum()) if bool(below.any()) else 0.0
    ratios = []
    for i in range(v.shape[0]):
        hit = (v[i] >= 1.9) & ok[i]
        if bool(hit.any()):
            ratios.append(float(res["p"][i][hit].max()) / (float(res["lr"][i, 0]) ** 2 / 2))
    onset = float(torch.tensor(ratios).median()) if ratios else math.nan
    lo, hi = float(v[ok].min()), float(v[ok].max())
    div = float(res["diverged"].float().mean())
    return {"min": lo, "max": hi, "saturated_below_curve": sat, "onset_ratio": onset, "diverged": div,
                "distance": abs(lo - 0.6) + abs(hi - 2.0) + (1 - sat) + div}


def run(cfg: SharpnessPhaseConfig, ctx: RunContext) -> None:
    from neurothermo.experiments import sharpness_checks as chk
    from neurothermo.experiments.sharpness_figures import phase_figure, series_figure

    cfg.check()
    g = torch.Generator().manual_seed(ctx.seed)
    chk.exact_checks(cfg, ctx)
    grid = run_grid(cfg, ctx, g, reading=cfg.reading, k=cfg.k, batch=cfg.batch_size, seeds=cfg.seeds,
                    sharp=True)
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


EXPERIMENT = register(
    Experiment(
        name="sharpness-phase",
        title="SGD sharpens (or flattens) toward the noise-balanced λ*(p), capped at 2/η (Figs. 5–6)",
        config=SharpnessPhaseConfig,
        quick=SharpnessPhaseConfig(
            lrs=(0.3125, 0.4375, 0.5625, 0.6875), ps=(0.01, 0.03, 0.1, 0.3), steps=20_000, seeds=4,
            compare=("input", "k1"), compare_seeds=2, probe_chains=8, conv_lrs=(0.03, 0.045, 0.07, 0.1),
            conv_steps=70_000, conv_chains=48, check_samples=5000),
        full=SharpnessPhaseConfig(),
        run=run,
        cost="full: 16 η × 27 p × 4 seeds from both starts, 4 other readings, probes, η → 0 study: "
             "≈ 165 s CPU on one core",
    )
)
