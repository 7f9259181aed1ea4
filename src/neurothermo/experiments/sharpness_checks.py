"""The predictions of ``sharpness-phase``, each with its tolerance derived in its ``why``.

Statistical checks use independent chains: a standard error is the chain-to-chain spread / √n of
second-half time averages, and ``Z = 3`` standard errors is the tolerance.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from neurothermo.experiments import sharpness_model as sm
from neurothermo.experiments.base import RunContext
from neurothermo.experiments.sharpness_grid import (
    grid_cells,
    grid_starts,
    picture_metrics,
    stationary,
)

if TYPE_CHECKING:
    from neurothermo.experiments.sharpness_phase import SharpnessPhaseConfig

DT = torch.float64
Z = 3.0  # z-score of the statistical checks (independent chains; ≈ 0.3 % two-sided per check)


def _t(x: Any) -> Tensor:
    return torch.tensor(x, dtype=DT)


def exact_checks(cfg: SharpnessPhaseConfig, ctx: RunContext) -> None:
    """Closed forms against the dense Hessian; zero expected charge change at the equilibrium."""
    k = _t([cfg.k])
    worst0 = worst_star = worst_drift = 0.0
    for p in cfg.ps:
        sx0, se0 = sm.covariances(p, cfg.reading)
        sx, se = _t([sx0]), _t([se0])
        eye = torch.eye(2, dtype=DT)[None]
        dense0 = float(sm.sharpness(eye, eye, sx, k)[0])
        worst0 = max(worst0, abs(dense0 / float(sm.start_sharpness(sx, k)[0]) - 1))
        A = torch.diag_embed(sm.equilibrium_scales(sx, se))
        dense = float(sm.sharpness(A, torch.linalg.inv(A), sx, k)[0])
        worst_star = max(worst_star, abs(dense / float(sm.equilibrium_sharpness(sx, se, k)[0]) - 1))
        scale = 4 * cfg.k**2 * float(sx.sum() * se.sum())
        worst_drift = max(worst_drift, float(sm.manifold_drift(A, sx, se, k, 1).abs().max()) / scale)
    ctx.predict("balanced-start sharpness 4K·max s_l vs dense Hessian (worst p)", worst0, 0.0, 1e-10,
                why="exact identity: float64 round-off only")
    ctx.predict("λ*(p) closed form vs dense Hessian at the noise-balanced point (worst p)", worst_star,
                0.0, 1e-10, why="exact identity: float64 round-off only")
    ctx.predict("E[g₁g₁ᵀ − g₂ᵀg₂] at the noise-balanced point / (4K²·TrΣ_x·TrΣ_ε) (worst p)", worst_drift,
                0.0, 1e-12, why="exact: the balance condition defines the point; round-off only")


def _zmin(gain: Tensor, se: Tensor, mask: Tensor) -> float:
    if not bool(mask.any()):
        return math.nan
    z = gain[mask] / se[mask].clamp(min=1e-300)
    return float(z.min())


def grid_checks(cfg: SharpnessPhaseConfig, ctx: RunContext, grid: dict[str, Tensor]) -> None:
    """Stable cells sharpen from the balanced start and flatten from a sharp one, to one stationary
    sharpness; nothing settles above η·λ = 2; no cell with a stable start diverges."""
    lr, lam, se, div = grid["lr"], grid["lam"], grid["se"], grid["diverged"]
    stable = (lr * grid["lam_star"] < 2) & ~div
    start_stable = lr * grid["start"] < 2
    ctx.predict("diverged cells among those whose start is stable (η·λ_start < 2)",
                float((div & start_stable).sum()), 0.0, 0.0,
                why="exact count: from a linearly stable minimum SGD drifts along the manifold, "
                    "it does not escape (a cell counts as diverged if any of its chains did)")
    d, dse = grid["drift"], grid["drift_se"]
    ctx.predict("min over stable cells of (Tr Q drift toward Tr Q*)/s.e., balanced start (sharpening)",
                _zmin(d, dse, stable), Z, 0.0, sense="at_least",
                why="3 s.e. in every cell with η·λ* < 2: the mean layer charge Tr Q = ‖W₁‖² − ‖W₂‖² moves "
                    "from the balanced start toward its noise-balanced value Σ(a_l² − a_l⁻²) (linear in Q, "
                    "so no fluctuation bias, unlike λ_max; invariant under the freely diffusing hidden "
                    "rotations); chains independent")
    frac_q = (d / grid["trq_star"].abs())[stable]
    ctx.record(charge_fraction_stable={
        "median": float(frac_q.median()) if len(frac_q) else math.nan,
        "min": float(frac_q.min()) if len(frac_q) else math.nan,
        "max": float(frac_q.max()) if len(frac_q) else math.nan,
        "note": "(Tr Q̄ − Tr Q₀)/(Tr Q* − Tr Q₀): the unbiased fraction of the way to the balance point"})
    gain_z = _zmin(lam - grid["ctrl_lam"], (se**2 + grid["ctrl_se"] ** 2).sqrt(), stable)
    ctx.record(control_p1_eta_lambda=_nan_list((lr * grid["ctrl_lam"])[:, :1].T)[0],
               min_z_lambda_above_p1_control=gain_z,
               control_p1_note="η·λ_max from the balanced start on balanced data (p = 1, λ* = λ₀): "
                               "the fluctuation bias of a top eigenvalue")
    both = stable & grid["sharp_present"] & ~grid["sharp_diverged"]
    sl, ss = grid["sharp_lam"], grid["sharp_se"]
    ctx.predict("max over stable cells of (λ_max − λ_start)/s.e., start sharper than λ* (flattening)",
                -_zmin(grid["sharp_start"] - sl, ss, both), -Z, 0.0, sense="at_most",
                why="3 s.e.: from a start sharper than λ* (but below 2/η) sharpness must fall")
    ctx.record(sharpening_z_from_sharp_start=_zmin(sl - grid["sharp_start"], ss, both),
               sharpening_z_note="min (λ_max − λ_start)/s.e. on the sharp-start chains (control: a start "
                                 "sharper than λ* must not sharpen, i.e. this lies below 3)",
               sharp_start_cells=int(both.sum()), sharp_start_diverged_cells=int(grid["sharp_diverged"].sum()))
    if bool(both.any()):
        d = ((lam - sl) / grid["lam_star"])[both]
        d_se = float(((se**2 + ss**2) / grid["lam_star"] ** 2)[both].sum().sqrt()) / int(both.sum())
        diff, z = float(d.mean()), ((lam - sl) / (se**2 + ss**2).sqrt())[both]
        ctx.record(meet_max_abs_z=float(z.abs().max()), meet_cells=int(both.sum()))
    else:
        diff, d_se = math.nan, 0.0
    ctx.predict("mean over stable cells of (λ̄ balanced start − λ̄ sharp start)/λ* (one stationary state)",
                diff, 0.0, Z * d_se,
                why="3 s.e. of the mean over cells (s.e. from independent chains): both starts must "
                    "reach the same stationary sharpness")
    ok = ~div
    ctx.predict("max over cells of (η·λ_max − 2)/(η·s.e.) (edge of stability)",
                -_zmin(2 - lr * lam, lr * se, ok), Z, 0.0, sense="at_most",
                why="3 s.e.: SGD cannot settle where η·λ_max > 2")
    frac = (lam - grid["lam0"]) / (grid["lam_star"] - grid["lam0"])
    f = frac[stable & (grid["lam_star"] - grid["lam0"] > 1e-6)]
    sat_region = (lr * grid["lam_star"] >= 2) & ok
    ctx.record(
        lrs=list(map(float, lr[:, 0])), ps=list(map(float, grid["p"][0])),
        eta_lambda=_nan_list(lr * lam), eta_lambda_se=_nan_list(lr * se),
        eta_lambda_star=(lr * grid["lam_star"]).tolist(), diverged_cells=int(div.sum()),
        sharpening_fraction_stable={
            "median": float(f.median()) if len(f) else math.nan, "min": float(f.min()) if len(f) else math.nan,
            "max": float(f.max()) if len(f) else math.nan,
            "note": "(λ_max − λ₀)/(λ* − λ₀) at the paper's η: the finite-η shortfall (1 = λ* reached)"},
        eta_lambda_in_saturated_region={
            "mean": float((lr * lam)[sat_region].mean()) if bool(sat_region.any()) else math.nan,
            "min": float((lr * lam)[sat_region].min()) if bool(sat_region.any()) else math.nan},
        K=cfg.k, reading=cfg.reading, batch_size=cfg.batch_size)


def _nan_list(x: Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else float(v) for v in row] for row in x.tolist()]


def probe_runs(cfg: SharpnessPhaseConfig, ctx: RunContext, g: torch.Generator) -> dict[str, Any]:
    """Both starts and the no-label-noise control at each probe (η, p); exact charge identity."""
    n, m = cfg.probe_chains, len(cfg.probe_lrs)
    parts = []
    for lr, p in zip(cfg.probe_lrs, cfg.probe_ps, strict=True):
        c = grid_cells((lr,), (p,), n, cfg.reading, cfg.k, cfg.label_noise)
        quiet = dict(c, se=torch.zeros_like(c["se"]))
        parts += [(c, "balanced"), (c, "sharp"), (quiet, "balanced")]
    cells = {key: torch.cat([c[key] for c, _ in parts]) for key in parts[0][0]}
    starts = [grid_starts(c, s) for c, s in parts]
    W1, W2 = torch.cat([s[0] for s in starts]), torch.cat([s[1] for s in starts])
    lam_start = sm.sharpness(W1, W2, cells["sx"], cells["k"])
    with ctx.progress("probe runs: both starts and the no-noise control", cfg.steps) as advance:
        lam, _, _, _, (res, first) = sm.simulate(
            W1, W2, lr=cells["lr"], k=cells["k"], sx=cells["sx"], se=cells["se"], batch=cfg.batch_size,
            steps=cfg.steps, every=cfg.hessian_every, generator=g, advance=advance,
            track_charge=cfg.charge_steps)
    ctx.predict("charge identity ΔQ = η²(g₁g₁ᵀ − g₂ᵀg₂) along the probe runs (RMS relative residual)",
                res, 0.0, 1e-12,
                why="exact for any η (first-order terms cancel by the GL(2) symmetry); float64 round-off")
    ctx.record(charge_first_order_error=first,
               charge_first_order_note="RMS |ΔQ − 0|/|η²(g₁g₁ᵀ − g₂ᵀg₂)|: gradient-flow conservation "
                                       "misses the whole change")
    per_chain, dead = stationary(lam)
    v = per_chain.reshape(m, 3, n)
    mean = v.nanmean(-1)
    se = v.std(-1) / math.sqrt(n)
    start = lam_start.reshape(m, 3, n)[..., 0]
    star = cells["lam_star"].reshape(m, 3, n)[:, 0, 0]
    drift = ((mean[:, 2] - start[:, 2]).abs() / start[:, 2]).max()
    ctx.predict("control, no label noise: max |λ_max − λ₀|/λ₀ (nothing moves)", float(drift), 0.0, 1e-12,
                why="exact: on the manifold every per-sample residual is 0 without label noise, so SGD "
                    "never leaves the start")
    ctx.record(probes=[{"eta": lr, "p": p, "lam_star": float(star[i]), "lam_balanced": float(mean[i, 0]),
                            "lam_balanced_se": float(se[i, 0]), "lam_sharp_start": float(start[i, 1]),
                            "lam_sharp": float(mean[i, 1]), "lam_sharp_se": float(se[i, 1]),
                            "lam_no_label_noise": float(mean[i, 2]), "diverged": int(dead.reshape(m, 3, n)[i].sum())}
                       for i, (lr, p) in enumerate(zip(cfg.probe_lrs, cfg.probe_ps, strict=True))])
    series = lam.reshape(lam.shape[0], m, 3, n).nanmean(-1)                # (R, m, 3)
    return {"series": series, "star": star, "lrs": cfg.probe_lrs, "ps": cfg.probe_ps}


def _wls(X: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares ``y ≈ X c`` with known errors ``s``; covariance scaled by max(1, χ²/dof)."""
    w = 1 / s
    A, b = X * w[:, None], y * w
    coef, *_ = np.linalg.lstsq(A, b, rcond=None)
    cov = np.linalg.inv(A.T @ A)
    dof = max(len(y) - X.shape[1], 1)
    chi2 = float(((A @ coef - b) ** 2).sum()) / dof
    return coef, cov * max(1.0, chi2)


def convergence(cfg: SharpnessPhaseConfig, ctx: RunContext, g: torch.Generator) -> dict[str, Any]:
    """Stationary sharpness from the balanced start at small η → λ*; the gap's scaling with η."""
    n = cfg.conv_chains
    c = grid_cells(tuple(cfg.conv_lrs), (cfg.conv_p,), n, cfg.reading, cfg.k, cfg.label_noise)
    W1, W2 = grid_starts(c, "balanced")
    with ctx.progress("η → 0: stationary sharpness", cfg.conv_steps) as advance:
        lam, *_ = sm.simulate(W1, W2, lr=c["lr"], k=c["k"], sx=c["sx"], se=c["se"], batch=cfg.conv_batch,
                              steps=cfg.conv_steps, every=cfg.hessian_every, generator=g, advance=advance)
    per_chain, _ = stationary(lam)
    v = per_chain.reshape(len(cfg.conv_lrs), n)
    mean = v.nanmean(1).numpy()
    se = (v.std(1) / math.sqrt(n)).numpy()
    lam_star = float(c["lam_star"][0])
    eta = np.array(cfg.conv_lrs)
    gap = lam_star - mean
    out: dict[str, Any] = {"eta": eta, "mean": mean, "se": se, "lam_star": lam_star, "lam0": float(c["lam0"][0])}
    if not (np.isfinite(mean).all() and np.isfinite(se).all() and (se > 0).all()):
        ctx.predict("η → 0: fitted intercept of λ̄(η) = c₀ + c₁η + c₂η² vs λ*", math.nan, lam_star, 0.0,
                    why="a chain diverged or did not move: nothing to fit")
        ctx.predict("η → 0: log-log slope of the gap λ* − λ̄ over the smallest η", math.nan, 1.0, 0.0,
                    why="a chain diverged or did not move: nothing to fit")
        return out
    X = np.stack([np.ones_like(eta), eta, eta**2], 1)
    coef, cov = _wls(X, mean, se)
    out["fit"] = coef
    ctx.predict("η → 0: fitted intercept of λ̄(η) = c₀ + c₁η + c₂η² vs λ*", float(coef[0]), lam_star,
                Z * math.sqrt(cov[0, 0]),
                why="3 s.e. of the weighted fit (errors: chain-to-chain s.e. of second-half averages)")
    small = np.argsort(eta)[: max(3, len(eta) // 2 + 1)]          # the smallest half, at least 3
    if (gap[small] > 0).all():
        Xl = np.stack([np.log(eta[small]), np.ones(len(small))], 1)
        cl, covl = _wls(Xl, np.log(gap[small]), se[small] / gap[small])
        slope, slope_se = float(cl[0]), math.sqrt(covl[0, 0])
    else:
        slope, slope_se = math.nan, 0.0
    ctx.predict("η → 0: log-log slope of the gap λ* − λ̄ over the smallest η", slope, 1.0,
                Z * slope_se if slope_se > 0 else 0.0,
                why="leading-order theory: the gap is O(η); 3 s.e. of the weighted log-log fit")
    ctx.record(eta_to_zero={"p": cfg.conv_p, "batch": cfg.conv_batch, "eta": eta.tolist(), "lam": mean.tolist(),
                                "se": se.tolist(), "lam_star": lam_star, "gap": gap.tolist(),
                                "fit_c0_c1_c2": coef.tolist(), "slope": slope, "slope_se": slope_se,
                                "gap_per_eta_over_lam_star": float(coef[1]) / -lam_star})
    return out


def compare_readings(cfg: SharpnessPhaseConfig, ctx: RunContext, grid: dict[str, Tensor],
                     others: dict[str, dict[str, Tensor]]) -> None:
    """Picture metrics of each reading of 'data balance'; the closest to the paper's figure."""
    main = f"{cfg.reading}, K={cfg.k:g}, b={cfg.batch_size} (main grid)"
    table = {main: picture_metrics(grid)}
    names = {"label": "label, K=0.5", "input": "input, K=0.5", "both": "both, K=0.5",
             "k1": "label, K=1", "b1": "label, K=0.5, b=1"}
    for key, res in others.items():
        table[names[key]] = picture_metrics(res)
    best = min(table, key=lambda name: table[name]["distance"])
    ctx.record(readings=table, closest_to_paper=best,
               readings_note="paper: colour 0.6 … 2.0, η·λ ≈ 2 below p = η²/2; distance = |min − 0.6| + "
                             "|max − 2| + (1 − saturated fraction below the curve) + diverged fraction")


def cross_check(cfg: SharpnessPhaseConfig, ctx: RunContext, g: torch.Generator) -> None:
    """``nt.top_eigenvalues`` (Lanczos) on a fixed sample vs the exact population sharpness."""
    from torch import nn

    from neurothermo.curvature import top_eigenvalues

    p, k = cfg.probe_ps[0], cfg.k
    sx0, se0 = sm.covariances(p, cfg.reading)
    sx, se = _t([sx0]), _t([se0])
    A = torch.diag_embed(sm.equilibrium_scales(sx, se))[0]
    first, second = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    net = nn.Sequential(first, second).double()
    with torch.no_grad():
        first.weight.copy_(A)
        second.weight.copy_(torch.linalg.inv(A))
    nsamp = cfg.check_samples
    x = torch.randn(nsamp, 2, generator=g, dtype=DT) * sx.sqrt()
    y = x + torch.randn(nsamp, 2, generator=g, dtype=DT) * se.sqrt()
    mse = nn.MSELoss()

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        result: Tensor = mse(out, target) * (2 * k)          # nn.MSELoss is K = ½; rescale to the configured K
        return result

    res = top_eigenvalues(net, loss_fn, (x, y), k=1, tol=1e-8)
    exact = float(sm.equilibrium_sharpness(sx, se, k)[0])
    ctx.predict("Lanczos sharpness of the sampled-data loss vs exact population λ*", float(res.values[0]),
                exact, 6 / math.sqrt(nsamp), relative=True,
                why="the sample covariance of x has relative error √(2/n) per entry; 6/√n ≈ 4 s.e.")
