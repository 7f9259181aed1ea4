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


def normalised_imbalance(traces: list[Trace], fam: str) -> np.ndarray:
    num = 0.0
    den = 0.0
    for t in traces:
        if t.fam != fam:
            continue
        j = t.stacked("charge").numpy()
        mag = np.sqrt((j**2).sum(axis=(-2, -1))) if j.ndim >= 3 else np.abs(j)
        num = num + mag.reshape(mag.shape[0], -1).sum(1)
        den = den + t.stacked("gross").numpy().sum(1)
    result: np.ndarray = np.asarray(num) / np.asarray(den)
    return result


def late_energies(t: Trace, start: int, lr: float, wd: float) -> tuple[np.ndarray, np.ndarray]:
    """(⟨e_in⟩, ⟨e_out⟩ + c⟨N⟩) per unit/head on the window; c = wd(2 − η·wd)/η and
    ``N_t = J_t − (1 − η·wd)^{2t}J_0`` the noise-driven part of the charge (as the law is checked)."""
    e_in = t.stacked("e_in").numpy()[start:].mean(0)
    e_out = t.stacked("e_out").numpy()[start:].mean(0)
    j = t.stacked("charge").numpy()
    steps = np.arange(j.shape[0], dtype=np.float64).reshape((-1,) + (1,) * (j.ndim - 1))
    j = (j - (1.0 - lr * wd) ** (2 * steps) * j[:1])[start:-1]
    jj = np.trace(j, axis1=-2, axis2=-1).reshape(j.shape[0], -1) if j.ndim >= 3 else j
    c = wd * (2.0 - lr * wd) / lr if wd else 0.0
    return e_in, e_out + c * jj.mean(0)


def draw_figures(ctx: Any, runs: dict[str, Any], cfg: Any, start: int) -> None:
    plt = pyplot()
    fams = [f for f in FAMILIES if any(t.fam == f for t in runs["sgd"].traces)]
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.6), squeeze=False)
    for ax, fam in zip(axes[0], fams, strict=True):
        for key, res in runs.items():
            color, ls, label = STYLE[key]
            y = normalised_imbalance(res.traces, fam)
            ax.plot(np.arange(len(y)), y, color=color, ls=ls, lw=1.2, label=label)
        main = runs["sgd"]
        y0 = normalised_imbalance(main.traces, fam)[0]
        steps = np.arange(main.spec.steps + 1)
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
                wd = res.spec.wd if key != "adamw" else 0.0
                first = min(start, res.spec.steps // 2)  # a shorter AdamW run: its second half
                e_in, rhs = late_energies(t, first, res.spec.lr, wd)
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
