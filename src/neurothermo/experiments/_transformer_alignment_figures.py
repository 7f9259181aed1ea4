"""Figures of ``transformer-alignment``: block × block maps (within and across networks, trained
and at initialisation), the MLP vs attention summary with standard errors, the cross-network
alignment along training, and the training curves."""
from __future__ import annotations

import math
from typing import Any

from neurothermo.alignment.grouped import GroupedAlignment
from neurothermo.experiments._common import pyplot
from neurothermo.experiments.base import RunContext

PANELS = (("trained", "within", "A vs A, trained"), ("trained", "cross", "A vs B, trained"),
          ("init", "cross", "A vs B, at initialisation"))


def draw_figures(ctx: RunContext, cfg: Any, maps: dict[str, dict[str, dict[str, GroupedAlignment]]],
                 numbers: dict[str, Any], curves: dict[str, list[float]], losses: dict[str, float],
                 h_unigram: float, steps_curve: dict[str, Any]) -> None:
    from neurothermo.experiments.transformer_alignment import METRICS

    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Patch

    n_blocks = len(maps["trained"]["cross"]["cka"].cols)
    size = max(3.6, 0.5 * n_blocks + 1.2)
    fig, axes = plt.subplots(len(METRICS), len(PANELS), figsize=(size * len(PANELS), size * len(METRICS)),
                             squeeze=False, layout="constrained")
    for row, (label, metric, _kw) in enumerate(METRICS):
        lo = min(-0.2, *(float(maps[w][s][metric].mean.min()) for w, s, _t in PANELS))
        norm = TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=1.0)
        for col, (when, side, title) in enumerate(PANELS):
            ax, m = axes[row, col], maps[when][side][metric]
            mean = m.mean
            im = ax.imshow(mean.numpy(), cmap="RdBu_r", norm=norm)
            for i in range(len(m.rows)):
                for j in range(len(m.cols)):
                    v = float(mean[i, j])
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(v) > 0.6 else "black")
            ax.set_xticks(range(len(m.cols)), [f"{'A' if side == 'within' else 'B'}: {c}" for c in m.cols],
                          rotation=90, fontsize=7)
            ax.set_yticks(range(len(m.rows)), [f"A: {r}" for r in m.rows], fontsize=7)
            ax.set_title(f"{label} — {title}", fontsize=9)
        ticks = [t / 10 for t in range(math.ceil(lo * 5) * 2, 11, 2)]
        fig.colorbar(im, ax=list(axes[row]), fraction=0.02, ticks=ticks)
    fig.suptitle(f"block outputs on held-out text (pool={cfg.pool}; mean over {cfg.groups} groups of "
                 "held-out windows)")
    ctx.savefig(fig, "transformer_alignment")

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), squeeze=False,
                             layout="constrained")
    for ax, (label, metric, _kw) in zip(axes[0], METRICS):
        rec = numbers[metric]
        for x, kind, color in ((0, "mlp", "tab:red"), (1, "attn", "tab:blue")):
            for dx, when, hatch in ((-0.18, "init", "//"), (0.18, "trained", "")):
                mean, se = rec[f"{kind}_{when}"]
                ax.bar(x + dx, mean, 0.34, yerr=se, color=color, alpha=0.45 if when == "init" else 0.9,
                       hatch=hatch, capsize=3)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks([0, 1], ["MLP × MLP", "attn × attn"])
        ax.set_title(f"{label}: A vs B, mean over cells (± se)", fontsize=9)
        ax.legend(handles=[Patch(facecolor="lightgray", hatch="//", label="at initialisation"),
                           Patch(facecolor="dimgray", label="trained")], fontsize=7)
    ctx.savefig(fig, "block_summary")

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for tag, curve in curves.items():
        steps = [min((i + 1) * cfg.log_every, cfg.steps) for i in range(len(curve))]
        line = ax.plot(steps, curve, label=f"net {tag} train")[0]
        ax.axhline(losses[tag], color=line.get_color(), ls="--", lw=1, label=f"net {tag} held-out")
    ax.axhline(h_unigram, color="black", ls=":", label="unigram entropy (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / char)")
    ax.legend(fontsize=8)
    ctx.savefig(fig, "training")

    steps = steps_curve["steps"]
    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(3.8 * (len(METRICS) + 1), 3.6), squeeze=False,
                             layout="constrained")
    for ax, (label, metric, _kw) in zip(axes[0], METRICS):
        for kind, color, name in (("mlp", "tab:red", "MLP × MLP"), ("attn", "tab:blue", "attn × attn")):
            ms, ses = zip(*steps_curve[metric][kind])
            ax.errorbar(steps, ms, yerr=ses, color=color, marker="o", ms=3, capsize=2, label=name)
        ax.axhline(0.0, color="black", lw=0.8)
        _step_axis(ax, steps)
        ax.set_xlabel("training step (0: initialisation)")
        ax.set_title(f"{label}: A vs B, mean over cells (± se)", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[0, -1]
    for tag, vals in steps_curve["held_out_loss"].items():
        ax.plot(steps, vals, marker="o", ms=3, label=f"net {tag}")
    ax.axhline(h_unigram, color="black", ls=":", label="unigram entropy")
    _step_axis(ax, steps)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out cross entropy (nats / char)")
    ax.legend(fontsize=7)
    fig.suptitle(f"alignment along one run (lr schedule to step {cfg.steps}; held-out groups give the errors)")
    ctx.savefig(fig, "alignment_vs_steps")


def _step_axis(ax: Any, steps: list[int]) -> None:
    """Linear up to the first checkpoint, logarithmic beyond; no negative side."""
    lin = max(steps[1] if len(steps) > 1 else 1, 1)
    ax.set_xscale("symlog", linthresh=lin)
    ax.set_xlim(-0.15 * lin, max(steps[-1], 1) * 1.2)
