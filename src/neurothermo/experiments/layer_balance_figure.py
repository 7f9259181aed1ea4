"""The figure of ``layer-balance`` (the paper's Fig. 2 and the identities behind it)."""
from __future__ import annotations

from typing import Any

import numpy as np

from neurothermo.experiments._common import pyplot
from neurothermo.monitor import names


def _diag(ax: Any) -> None:
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


def figure(cfg: Any, ctx: Any, runs: dict[str, Any], sums: dict[str, dict[str, Any]], source: str) -> None:
    """2 × 4 panels: per-layer E‖g_k‖² over time (reference, deep runs), pair ratios over time,
    per-neuron E[e_in] vs E[e_out], the weight-decay law per neuron, and the drift identity."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 4, figsize=(17, 8))
    deep = [k for k in runs if k.startswith("deep ") and k != "deep + wd"]
    for ax, k in zip(axes[0, :3], ["reference", *deep]):
        _, h, _ = runs[k]
        for li, layer in enumerate(h.meta["layers"]):
            col = names.grad_sq_ema(layer)
            ax.plot(h.steps(col), h[col], color=colors[li % len(colors)], label=f"Linear {layer}")
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{k}: E‖g_k‖² per layer (EMA)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    ax = axes[0, 3]
    for j, (k, (_, h, _)) in enumerate(runs.items()):
        syms = [i for i, s in enumerate(h.meta.get("symmetries", [])) if s["kind"] == "rescale"]
        for n_i, i in enumerate(syms):
            col = names.neuron_ratio(i)
            ax.plot(h.steps(col), h[col], color=colors[j % len(colors)], ls=("-", "--", ":", "-.")[n_i % 4],
                    lw=1, label=f"{k}, pair {n_i}")
    ax.axhline(1.0, color="k", lw=1)
    ax.set_yscale("log")
    ax.set_title("Σ_u E[e_in] / Σ_u E[e_out] per pair (EMA)", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=5, ncol=2)

    balanced = [k for k in runs if k.startswith("balance ") and "control" not in k]
    for ax, keys in ((axes[1, 0], ["reference", "GD control", "small-η control"]),
                     (axes[1, 1], [*deep, *balanced])):
        for j, k in enumerate(keys):
            for n_i, nb in enumerate(sums[k]["nb"]):
                ax.loglog(nb.energy_in, nb.energy_out, "o^sD"[n_i % 4], ms=3, alpha=0.7,
                          color=colors[j % len(colors)], label=f"{k}, {nb.location.split(' (')[0]}")
        _diag(ax)
        ax.set_xlabel("E[e_in] per unit (window)")
        ax.set_ylabel("E[e_out] per unit")
        ax.set_title("neuron balance: the diagonal is E[e_in] = E[e_out]", fontsize=9)
        ax.legend(fontsize=5)
    ax = axes[1, 2]
    for n_i, d in enumerate(sums["deep + wd"]["drift"]):
        ax.plot(d.decay, d.imbalance, "o", ms=3, color=colors[n_i % len(colors)], label=f"pair {n_i}")
    _diag(ax)
    ax.set_xlabel("wd(2 − η·wd)·E[J_u]/η")
    ax.set_ylabel("E[e_in − e_out] per unit")
    ax.set_title(f"weight decay wd = {cfg.weight_decay}: stationary law per neuron", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1, 3]
    for j, (k, s) in enumerate(sums.items()):
        xs = np.concatenate([d.drift + d.decay for d in s["drift"]])
        ys = np.concatenate([d.imbalance for d in s["drift"]])
        ax.plot(xs, ys, ".", ms=3, color=colors[j % len(colors)], label=k)
    _diag(ax)
    ax.set_xlabel("(ΔJ_u + wd term)/(η²T)  (parameters only)")
    ax.set_ylabel("mean η²-weighted e_in − e_out  (gradients only)")
    ax.set_title("drift identity per unit, every run (exact)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.suptitle(f"layer and neuron balance, η = {cfg.lr}, b = {cfg.batch_size}; {source}", fontsize=10)
    ctx.savefig(fig, "layer_balance")
