"""Figures of ``gpt-balance``.

``imbalance``: per family, the normalised charge ``Σ|J| / Σ gross`` (Frobenius norm of each head's
matrix charge; ``|J_u|`` per unit) against steps, log scale: SGD, the small-η control, the broken
control and AdamW, with the theory curve ``(1 − η·wd)^{2t}`` times the start (how fast SGD with
decay forgets an initial imbalance, before the η² noise term sets the floor) and the window of the
law. ``energies``: per unit (MLP, LayerNorm) and per head (Q/K, V/O, trace), the late-window
⟨‖g_in‖²⟩ against ⟨‖g_out‖²⟩ + c·⟨N⟩ (SGD: the weight-decay law on the noise-driven charge N
puts every point on the diagonal; only the family and per-layer/per-head sums are checked) beside AdamW's ⟨‖g_in‖²⟩ against ⟨‖g_out‖²⟩ (measured, no prediction).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from neurothermo.experiments._common import pyplot
from neurothermo.experiments._gpt_balance_train import FAMILIES, FAMILY_LABEL, Trace

STYLE = {"sgd": ("C0", "-", "SGD"), "small-lr": ("C1", ":", "SGD, small η (control)"),
         "broken": ("C3", "-.", "SGD, W_K undecayed (control)"), "adamw": ("C2", "--", "AdamW")}
COLORS = {"qk": "C0", "vo": "C1", "mlp": "C2", "ln": "C4"}


def normalised_imbalance(traces: list[Trace], fam: str) -> tuple[np.ndarray, np.ndarray]:
    """(sampled steps, Σ|J| / Σ gross over the family)."""
    num: Any = 0.0
    den: Any = 0.0
    steps = np.zeros(0)
    for t in traces:
        if t.fam != fam:
            continue
        steps, size, gross = t.series_numpy()
        num, den = num + size, den + gross
    return steps, np.asarray(num) / np.asarray(den)


def late_energies(t: Trace, window: str) -> tuple[np.ndarray, np.ndarray]:
    """(⟨e_in⟩, ⟨e_out⟩ + c⟨N⟩) per unit/head on the window (``c = wd(2 − η·wd)/η`` for SGD,
    0 for AdamW; ``N_t = J_t − (1 − η·wd)^{2t}J_0`` the noise-driven charge, as the law is
    checked)."""
    s = t.sums[window]
    n = float(s.win.stop - s.win.start)
    d = s.numpy()
    return d["e_in"] / n, (d["e_out"] + d["cn"]) / n


def draw_figures(ctx: Any, runs: dict[str, Any], cfg: Any, start: int) -> None:
    plt = pyplot()
    fams = [f for f in FAMILIES if any(t.fam == f for t in runs["sgd"].traces)]
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.6), squeeze=False)
    for ax, fam in zip(axes[0], fams, strict=True):
        for key, res in runs.items():
            color, ls, label = STYLE[key]
            x, y = normalised_imbalance(res.traces, fam)
            ax.plot(x, y, color=color, ls=ls, lw=1.2, label=label)
        main = runs["sgd"]
        y0 = normalised_imbalance(main.traces, fam)[1][0]
        steps = np.linspace(0, main.spec.steps, 300)
        ax.plot(steps, y0 * (1 - main.spec.lr * main.spec.wd) ** (2 * steps), color="k", lw=0.8,
                label="(1 − η·wd)^{2t} × start")
        ax.axvspan(start, main.spec.steps, color="0.9", zorder=0)
        ax.set_yscale("log")
        ax.set_title(FAMILY_LABEL[fam], fontsize=10)
        ax.set_xlabel("SGD / AdamW step")
    axes[0][0].set_ylabel("Σ|J| / Σ(‖θ_in‖² + ‖θ_out‖²)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Imbalance of the charges along training (grey: the window of the law)")
    ctx.savefig(fig, "imbalance")

    panels = [("sgd", "SGD: ⟨‖g_out‖²⟩ + wd(2−η·wd)⟨N⟩/η")]
    if "adamw" in runs:
        panels.append(("adamw", "AdamW: ⟨‖g_out‖²⟩ (measured only)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], panels, strict=True):
        res = runs[key]
        lo, hi = np.inf, 0.0
        dropped = 0
        for fam in fams:
            xs, ys = [], []
            for t in res.traces:
                if t.fam != fam:
                    continue
                e_in, rhs = late_energies(t, "energies")
                xs.append(rhs)
                ys.append(e_in)
            x, y = np.concatenate(xs), np.concatenate(ys)
            ok = (x > 0) & (y > 0)
            dropped += int((~ok).sum())
            if ok.any():
                ax.scatter(x[ok], y[ok], s=8, color=COLORS[fam], label=FAMILY_LABEL[fam], alpha=0.7)
                lo, hi = min(lo, x[ok].min(), y[ok].min()), max(hi, x[ok].max(), y[ok].max())
        if hi > 0:
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, label="diagonal (balance)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel + ("" if not dropped else f"  [{dropped} ≤ 0 not shown]"), fontsize=8)
        ax.set_ylabel("⟨‖g_in‖²⟩ per unit / head")
        ax.legend(fontsize=7)
    fig.suptitle(f"Gradient energies per unit and head, SGD steps {start}–{runs['sgd'].spec.steps}"
                 " (AdamW: the second half of its run if shorter)")
    ctx.savefig(fig, "energies")
