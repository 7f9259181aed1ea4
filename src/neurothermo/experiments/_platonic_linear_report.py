"""The summary table (condition → predicted → measured), its predictions and the figure of platonic-linear."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from neurothermo.experiments._common import pyplot
from neurothermo.experiments.base import RunContext

# condition → (theory says aligned with K*?, the kernel it predicts instead, the reason)
EXPECTED: dict[str, tuple[bool, str, str]] = {
    "reference": (True, "K*", "label noise balances the charges at K* whatever the architecture"),
    "no label noise": (False, "none (init-dependent)",
                       "no gradient noise at the minimum: the charges freeze where the descent left them"),
    "weight decay": (False, "M_inᵀ(PᵀP)^{k/D}M_in per layer",
                     "weight decay drives the charges to 0 (balanced factorisation), not to the noise balance"),
    "label transform": (False, "K_T (net B)",
                        "net B balances the transformed noise TΣ_εTᵀ against the teacher TV*"),
    "input-dependent noise": (False, "K_s (Σ_x → E[s(x)xxᵀ])",
                              "the noise weights inputs by s(x) on both sides of the balance"),
    "GD": (False, "none (init-dependent)", "full-batch GD conserves the initial charges"),
    "untrained": (False, "none (random)", "nothing has been learnt"),
}


def _median(parts: list[Tensor]) -> float:
    """Median over chains and layers; NaN (a diverged chain) if any entry is NaN."""
    v = torch.cat([p.flatten() for p in parts])
    return float("nan") if bool(torch.isnan(v).any()) else float(v.median())


def summarise(ctx: RunContext, dist: dict[str, dict[str, Tensor]], dpred: dict[str, dict[str, Tensor]],
              tau: float) -> list[dict[str, Any]]:
    """One row per condition: prediction, median distance to K* and to the predicted kernel; the
    predictions "aligned with K*" (≤ τ) where the theory says aligned, "not aligned" (≥ τ) where it
    says broken, and "aligned with the predicted kernel" where it predicts another one."""
    rows = []
    for cond, (aligned, kernel, reason) in EXPECTED.items():
        nets = ["B"] if cond == "label transform" else sorted(dist[cond])
        d_star = _median([dist[cond][n] for n in nets])
        has_pred = cond in dpred and not kernel.startswith("none") and cond != "reference"
        d_pred = _median([dpred[cond][n] for n in nets]) if has_pred else None
        row = {"condition": cond, "predicted_aligned_with_kstar": aligned, "predicted_kernel": kernel,
               "nets": nets, "median_distance_to_kstar": d_star,
               "measured_aligned_with_kstar": bool(d_star <= tau),
               "median_distance_to_predicted": d_pred,
               "measured_aligned_with_predicted": None if d_pred is None else bool(d_pred <= tau)}
        rows.append(row)
        if aligned:
            ctx.predict(f"{cond}: aligned with K* (median distance ≤ τ)", d_star, 0.0, tau,
                        sense="at_most", why=reason + "; τ: see the separation check")
        else:
            ctx.predict(f"{cond}: not aligned with K* (median distance ≥ τ)", d_star, tau, 0.0,
                        sense="at_least", why=reason)
        if d_pred is not None:
            ctx.predict(f"{cond}: aligned with {kernel} (median distance ≤ τ)", d_pred, 0.0, tau,
                        sense="at_most", why=reason)
    return rows


def figure(ctx: RunContext, table: list[dict[str, Any]], dist: dict[str, dict[str, Tensor]],
           dpred: dict[str, dict[str, Tensor]], maps: dict[str, Tensor], tau: float,
           cos_min: float) -> None:
    plt = pyplot()
    fig = plt.figure(figsize=(21, 10))
    gs = fig.add_gridspec(2, 4, height_ratios=[1.3, 1], width_ratios=[1.6, 1, 1, 1])
    ax = fig.add_subplot(gs[0, 0])
    for i, row in enumerate(table):
        cond = row["condition"]
        for j, n in enumerate(row["nets"]):
            v = dist[cond][n].flatten()
            ax.scatter(i + 0.12 * (j - 0.5) + torch.zeros_like(v), v, s=14, color="tab:blue",
                       label="to K*" if i == 0 and j == 0 else None)
            if row["median_distance_to_predicted"] is not None:
                p = dpred[cond][n].flatten()
                ax.scatter(i + 0.12 * (j - 0.5) + 0.3 + torch.zeros_like(p), p, s=18, marker="x",
                           color="tab:green", label="to its predicted kernel" if i == 2 and j == 0 else None)
    ax.axhline(tau, color="black", ls=":", lw=1, label=f"τ = {tau:g}")
    ax.set_xticks(range(len(table)), [r["condition"] for r in table], fontsize=8,
                  rotation=30, ha="right")
    ax.set_ylabel("‖G/‖G‖ − G*/‖G*‖‖ (kernel distance)")
    ax.set_title("hidden layers (all chains) per condition")
    ax.legend(fontsize=8)
    for col, (kind, title) in enumerate((("sgd", "reference SGD"), ("gd", "GD control"),
                                         ("transform", "labels Ty for net B"))):
        ax = fig.add_subplot(gs[0, col + 1])
        m = maps[kind].numpy()
        im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(m.shape[1]), [f"B:h{j + 1}" for j in range(m.shape[1])])
        ax.set_yticks(range(m.shape[0]), [f"A:h{i + 1}" for i in range(m.shape[0])])
        ax.set_title(f"{title}\ncross-network Gram cosine\n(aligned ⇒ ≥ {cos_min:.2f})", fontsize=9)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if m[i, j] > 0.6 else "white")
        fig.colorbar(im, ax=ax)
    ax = fig.add_subplot(gs[1, :])
    ax.axis("off")

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    cells = [[r["condition"], "aligned" if r["predicted_aligned_with_kstar"] else "broken",
              r["predicted_kernel"], ",".join(r["nets"]), fmt(r["median_distance_to_kstar"]),
              "aligned" if r["measured_aligned_with_kstar"] else "broken",
              fmt(r["median_distance_to_predicted"])] for r in table]
    tab = ax.table(cellText=cells, loc="center", cellLoc="left",
                   colLabels=["condition", "predicted (K*)", "predicted kernel", "nets",
                              "median dist. to K*", f"measured (≤ τ = {tau:g})", "median dist. to predicted"])
    tab.auto_set_font_size(False)
    tab.set_fontsize(9)
    tab.scale(1, 1.6)
    ctx.savefig(fig, "platonic_linear")
