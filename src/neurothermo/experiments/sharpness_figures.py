"""Figures of ``sharpness-phase``: the (η × p) phase diagram per reading, and sharpness over time."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from neurothermo.experiments import sharpness_model as sm
from neurothermo.experiments._common import pyplot
from neurothermo.experiments.base import RunContext

if TYPE_CHECKING:
    from neurothermo.experiments.sharpness_phase import SharpnessPhaseConfig

READING = {"label": ("label", 0.5), "input": ("input", 0.5), "both": ("both", 0.5), "k1": ("label", 1.0),
           "b1": ("label", 0.5)}


def cell_edges(values: Any, lower: float | None = None) -> np.ndarray:
    """Edges of cells centred on sorted ``values``: midpoints inside, mirrored half-gaps outside.

    One value gets ±5 %; ``lower`` clips the first edge (p ≥ 0).
    """
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        e = np.array([v[0] * 0.95, v[0] * 1.05])
    else:
        mid = (v[1:] + v[:-1]) / 2
        e = np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])
    if lower is not None:
        e[0] = max(e[0], lower)
    return e


def _panel(ax: Any, res: dict[str, Tensor], title: str, reading: str, k: float) -> Any:
    lrs = res["lr"][:, 0].numpy()
    ps = res["p"][0].numpy()
    v = (res["lr"] * res["lam"]).numpy().T                    # (p, η): y = p, x = η
    dead = res["diverged"].numpy().T
    masked = np.ma.masked_where(dead | ~np.isfinite(v), v)
    xe, ye = cell_edges(lrs), cell_edges(ps, lower=0.0)
    im = ax.pcolormesh(xe, ye, masked, cmap="viridis", vmin=0.6, vmax=2.0, shading="flat")
    from matplotlib.patches import Rectangle

    for j, i in zip(*np.nonzero(dead), strict=True):           # hatch diverged cells, no number
        ax.add_patch(Rectangle(
            (xe[i], ye[j]), xe[i + 1] - xe[i], ye[j + 1] - ye[j], facecolor="lightgrey",
            edgecolor="black", hatch="///", lw=0))
    pp = np.linspace(max(ye[0], 1e-4), min(ye[-1], 1.0), 300)
    ax.plot(np.sqrt(2 * pp), pp, "w--", lw=1.5, label="paper's curve p = η²/2")
    boundary = np.array([2 / sm.lambda_star(float(p), k, reading) for p in pp])
    ax.plot(boundary, pp, "r-", lw=2, label=f"exact η·λ*(p) = 2 ({reading}, K = {k:g})")
    ax.set_xlim(xe[0], xe[-1])
    ax.set_ylim(ye[0], ye[-1])
    ax.set_xlabel("learning rate η")
    ax.set_ylabel("data balance p")
    ax.set_title(title, fontsize=9)
    return im


def phase_figure(cfg: SharpnessPhaseConfig, ctx: RunContext, grid: dict[str, Tensor],
                 others: dict[str, dict[str, Tensor]]) -> None:
    """Phase diagram: η on x, p on y, colour η·λ_max (0.6 … 2), diverged cells hatched."""
    plt = pyplot()
    panels = [(f"{cfg.reading}, K = {cfg.k:g}, b = {cfg.batch_size} (main)", grid, cfg.reading, cfg.k)]
    for name, res in others.items():
        reading, k = READING[name]
        b = 1 if name == "b1" else cfg.batch_size
        panels.append((f"{reading}, K = {k:g}, b = {b}", res, reading, k))
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    im = None
    for ax, (title, res, reading, k) in zip(axes[0], panels, strict=True):
        im = _panel(ax, res, title, reading, k)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.colorbar(im, ax=axes[0].tolist(), label="η·λ_max (time average; hatched: diverged)")
    ctx.savefig(fig, "sharpness_phase")


def series_figure(cfg: SharpnessPhaseConfig, ctx: RunContext, probes: dict[str, Any],
                  conv: dict[str, Any]) -> None:
    """η·λ_max(t) from both starts with η·λ* and 2 drawn; the η → 0 convergence to λ*."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    series = probes["series"].numpy()                         # (R, m, 3)
    steps = np.arange(1, series.shape[0] + 1) * cfg.hessian_every
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (lr, p) in enumerate(zip(probes["lrs"], probes["ps"], strict=True)):
        c = colors[i % len(colors)]
        ax.plot(steps, lr * series[:, i, 0], color=c, label=f"η = {lr:g}, p = {p:g}: balanced start")
        ax.plot(steps, lr * series[:, i, 1], color=c, ls="--", label="   start sharper than λ*")
        ax.axhline(lr * float(probes["star"][i]), color=c, ls=":", lw=1)
    ax.axhline(2.0, color="black", lw=1, label="η·(2/η) = 2 (edge of stability)")
    if np.isfinite(series[:, :, :2]).any():
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "every probe chain diverged", ha="center", transform=ax.transAxes)
    ax.set_xlabel("SGD step")
    ax.set_ylabel("η·λ_max (exact population Hessian)")
    ax.set_title("sharpening and flattening toward η·λ* (dotted)")
    ax.legend(fontsize=7)
    eta, mean, se = conv["eta"], conv["mean"], conv["se"]
    ok = np.isfinite(mean)
    bx.errorbar(eta[ok], mean[ok], yerr=3 * se[ok], fmt="o", capsize=3, label="stationary λ̄ ± 3 s.e.")
    bx.axhline(conv["lam_star"], color="red", label="λ* (leading order in η)")
    bx.axhline(conv["lam0"], color="grey", ls=":", label="balanced start λ₀")
    if "fit" in conv:
        ee = np.linspace(0, eta.max() * 1.05, 100)
        c0, c1, c2 = conv["fit"]
        bx.plot(ee, c0 + c1 * ee + c2 * ee**2, "k--", lw=1, label="fit c₀ + c₁η + c₂η²")
    if not ok.any():
        bx.text(0.5, 0.5, "every chain diverged", ha="center", transform=bx.transAxes)
    bx.set_xlim(left=0)
    bx.set_xlabel("learning rate η")
    bx.set_ylabel("λ_max")
    bx.set_title(f"η → 0 (p = {cfg.conv_p:g}, b = {cfg.conv_batch})")
    bx.legend(fontsize=7)
    ctx.savefig(fig, "sharpness_series")
