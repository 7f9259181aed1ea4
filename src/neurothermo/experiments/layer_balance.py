"""``layer-balance``: SGD drives a ReLU MLP to layer and neuron gradient balance (§2, §5.2, Fig. 2).

THEORY.md §2. Rescaling hidden unit u (incoming weights and bias × e^λ, outgoing weights × e^−λ)
leaves a ReLU network's function unchanged, so its charge ``J_u = ‖w_u‖² + b_u² − ‖u_u‖²`` changes
under one SGD step by exactly ``η²·(‖g_{w_u}‖² + g_{b_u}² − ‖g_{u_u}‖²)`` (weight decay 0), at any η.
If the run is stationary (J bounded) the time average of that change is 0:

    neuron balance   E[‖g_{w_u}‖² + g_{b_u}²] = E‖g_{u_u}‖²        for every hidden unit u
    layer balance    Σ_u E[in] = Σ_u E[out],  i.e.  E‖g_k‖² = E‖g_{W_{k+1}}‖²

(with ``bias=False`` the second is literally equal expected squared minibatch-gradient norms of the
consecutive layers). Controls: full-batch GD (no noise: J is conserved up to the vanishing
``η²·ḡᵀAḡ``, so the network stays on the orbit it started on) and SGD with weight decay, whose
stationary condition is ``E[gᵀAg] = wd·(2 − η·wd)·E[J]/η ≠ 0`` (checked as an identity, and shown to
break balance).

**Why the defaults look the way they do** (measured, THEORY.md: relaxation ∝ 1/(η²·noise)).
J moves by ``η²·gᵀAg`` per step, so balance needs (i) a large squared relative step ``η²E‖g‖²/‖W‖²``
— learning rate 0.1 with batch size 1 gives ≈ 10⁻³, relaxation within ~10³ steps (a 128-wide net
with b = 32 stays unbalanced after 4000 steps) — and (ii) a *stationary* state. The theorem needs
J bounded, and three slow drifts feed J for ≫ 10⁴ steps while holding the ratio at 2–9:
biases (and non-centred inputs, whose mean acts as one) let the entropic force keep sparsifying
units (per-unit ratios up to ~9 for units active on < 5 % of the samples); pixels of tiny variance
leave first-layer weight directions that diffuse for ~1/(η·variance) steps; cross-entropy on
separable data grows the weights without bound. Hence the defaults: inputs are the top ``pca``
principal components, whitened (centred, unit variance in every direction, the same scale for
digits and MNIST); no biases; squared error on one-hot targets (finite-norm minima); one hidden
layer. Deeper nets are a setting: their hidden→hidden layers see non-negative ReLU outputs, whose
mean again acts as a bias, and within these budgets stay off balance (ratio ≈ 2–3.5; see the
report). Two starts on opposite sides of balance (``init_scales``: every hidden unit's incoming
weights × s, outgoing ÷ s — the same function) show balance is an attractor, not a coincidence.

Averages are over the last ``window`` of recorded steps; standard errors from batch means
(:func:`neurothermo.layer_balance`). Every claim uses a 3-SE tolerance (≈ 0.3 % false failures for
a normal mean).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neurothermo.config import setting
from neurothermo.experiments._common import pyplot
from neurothermo.experiments.base import Experiment, RunContext, register
from neurothermo.monitor import names
from neurothermo.monitor.balance import block_means
from neurothermo.monitor.history import History

Z = 3.0  # tolerance in standard errors for every claim


@dataclass(frozen=True)
class LayerBalanceConfig:
    mnist_dir: str = setting("", "folder with the MNIST IDX files (train split); empty: scikit-learn digits")
    mnist_limit: int = setting(10_000, "MNIST training images used (the first n)", min=100, max=60_000)
    pca: int = setting(16, "inputs: the top k principal components, whitened; 0: raw pixels in [0, 1]",
                       min=0, max=784)
    hidden: tuple[int, ...] = setting((64,), "hidden widths of the ReLU MLP", min=1, max=4096)
    bias: bool = setting(False, "biases in the Linear layers (sparsification drift: see docstring)")
    loss: str = setting("mse", "'mse': ½‖f − onehot(y)‖² per sample; 'ce': cross-entropy",
                        choices=("mse", "ce"))
    optimizer: str = setting("sgd", "optimizer of the main runs ('gd' must fail the balance claims)",
                             choices=("sgd", "gd"))
    lr: float = setting(0.1, "learning rate η (all runs)", min=1e-6, max=10.0)
    batch_size: int = setting(1, "minibatch size b of the SGD runs", min=1, max=60_000)
    steps: int = setting(6000, "training steps of every run", min=100)
    init_scales: tuple[float, ...] = setting(
        (1.0, 0.5), "starts of the main runs: hidden units' in-weights × s, out-weights ÷ s", min=1e-3,
        max=1e3)
    weight_decay: float = setting(0.01, "wd of the weight-decay control (torch's: penalty (wd/2)‖θ‖²)",
                                  min=1e-6, max=1.0)
    record_every: int = setting(4, "the monitor records every this many steps", min=1)
    window: float = setting(0.5, "fraction of recorded steps at the end averaged over", min=0.05, max=1.0)
    n_blocks: int = setting(10, "batch-means blocks for the standard errors", min=4, max=200)

    def check(self) -> None:
        if self.mnist_dir and not Path(self.mnist_dir).is_dir():
            raise ValueError(f"mnist_dir={self.mnist_dir!r} is not a folder; give the folder holding "
                             "the MNIST IDX files, or leave it empty for scikit-learn digits")
        if len({f"{s:g}" for s in self.init_scales}) != len(self.init_scales):
            raise ValueError(f"init_scales={self.init_scales} repeats a start; list distinct scales")
        recorded = math.ceil(self.steps / self.record_every) * self.window
        if recorded < 4 * self.n_blocks:
            raise ValueError(
                f"only ~{recorded:.0f} recorded steps in the window for n_blocks={self.n_blocks}; "
                "raise steps or lower record_every / n_blocks")


# ---- data and model (pure functions) ----------------------------------------------------------

def whiten(x: Tensor, k: int) -> Tensor:
    """``(x − mean) V_k / √λ_k``: the top-k principal components with unit variance each (float64 SVD)."""
    if k > x.shape[1]:
        raise ValueError(f"pca={k} exceeds the input dimension {x.shape[1]}; use pca <= {x.shape[1]}")
    xc = x.double() - x.double().mean(0)
    _, s, vt = torch.linalg.svd(xc, full_matrices=False)
    var = s[:k] ** 2 / x.shape[0]
    if float(var[-1]) <= 1e-8 * float(var[0]):
        raise ValueError(
            f"pca={k}: the data has only {int((var > 1e-8 * var[0]).sum())} directions of nonzero "
            "variance; lower pca")
    return ((xc @ vt[:k].T) / var.sqrt()).to(x.dtype)


def load_data(cfg: LayerBalanceConfig) -> tuple[Tensor, Tensor, str]:
    """``(inputs, labels, description)``: MNIST from ``mnist_dir`` or scikit-learn digits, preprocessed."""
    from neurothermo.data import load_digits, read_mnist

    if cfg.mnist_dir:
        x, y = read_mnist(cfg.mnist_dir, limit=cfg.mnist_limit)
        source = f"MNIST ({x.shape[0]} training images from {cfg.mnist_dir})"
    else:
        x, y = load_digits()
        source = f"scikit-learn digits ({x.shape[0]} images, 8×8; mnist_dir not given)"
    if cfg.pca:
        x = whiten(x, cfg.pca)
        source += f", top {cfg.pca} principal components whitened"
    return x, y, source


def onehot_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean_i ½‖f(x_i) − onehot(y_i)‖²`` (mean over the batch, sum over the classes)."""
    onehot = nn.functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return 0.5 * (outputs - onehot).pow(2).sum(1).mean()


def build_model(d_in: int, cfg: LayerBalanceConfig, scale: float, seed: int) -> nn.Sequential:
    """torch's default init (seeded), then every hidden unit rescaled by ``scale`` (same function)."""
    from neurothermo.models.mlp import mlp

    torch.manual_seed(seed)
    model = mlp([d_in, *cfg.hidden, 10], bias=cfg.bias)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for a, b in pairwise(linears):
            a.weight.mul_(scale)
            if a.bias is not None:
                a.bias.mul_(scale)
            b.weight.div_(scale)
    return model


# ---- summaries of one run ---------------------------------------------------------------------

def rescale_indices(history: History) -> list[int]:
    return [i for i, s in enumerate(history.meta.get("symmetries", [])) if s["kind"] == "rescale"]


def _tail(history: History, column: str, window: float) -> np.ndarray:
    v = history[column].astype(np.float64)
    return v[len(v) - max(2, math.ceil(window * len(v))):]


def stationary_identity(history: History, i: int, lr: float, wd: float, window: float,
                        n_blocks: int) -> dict[str, float]:
    """Window means of ``Σ_u gᵀAg`` and of ``wd(2 − η·wd)·Σ_u J/η``, their difference and its SE."""
    imb = (_tail(history, names.energy_in(i), window)
           - _tail(history, names.energy_out(i), window)).sum(1)
    charge = _tail(history, names.charge(i), window).sum(1)
    pred = wd * (2 - lr * wd) * charge / lr
    blocks = block_means(imb - pred, min(n_blocks, len(imb)))
    cb = block_means(charge, min(n_blocks, len(charge)))
    return {"imbalance": float(imb.mean()), "predicted": float(pred.mean()),
            "diff_se": float(blocks.std(ddof=1) / math.sqrt(len(blocks))),
            "charge": float(charge.mean()), "charge_se": float(cb.std(ddof=1) / math.sqrt(len(cb)))}


def charge_drift(history: History, i: int) -> tuple[float, float]:
    """``(|Σ_u J_T − Σ_u J_0|, L_0 − L_T)`` from the first to the last recorded charge of symmetry i."""
    j = history[names.charge(i)].sum(1)
    last = history.steps(names.charge(i))[-1]
    loss = history[names.LOSS][history.steps(names.LOSS) <= last]
    return abs(float(j[-1] - j[0])), float(loss[0] - loss[-1])


def summarise(history: History, cfg: LayerBalanceConfig, wd: float = 0.0) -> dict[str, Any]:
    import neurothermo.monitor as nt

    lb = nt.layer_balance(history, window=cfg.window, n_blocks=cfg.n_blocks)
    nbs = nt.neuron_balance(history, window=cfg.window, n_blocks=cfg.n_blocks)
    first = [history[names.energy_in(i)][:10].sum() / history[names.energy_out(i)][:10].sum()
             for i in rescale_indices(history)]
    return {
        "lb": lb, "nb": nbs, "initial_ratio": [float(r) for r in first],
        "identity": [stationary_identity(history, i, cfg.lr, wd, cfg.window, cfg.n_blocks)
                     for i in rescale_indices(history)],
        "loss": float(_tail(history, names.LOSS, cfg.window).mean()),
    }


def _record(s: dict[str, Any]) -> dict[str, Any]:
    lb = s["lb"]
    return {
        "loss": s["loss"], "initial_pair_ratio": s["initial_ratio"],
        "pair_ratio": lb.pair_ratio.tolist(), "pair_ratio_se": lb.pair_ratio_se.tolist(),
        "layer_sq_norm": lb.sq_norm.tolist(), "layer_ratio": lb.ratio.tolist(),
        "charge": [d["charge"] for d in s["identity"]],
        "neuron": [{"location": n.location, "slope": n.slope, "slope_se": n.slope_se,
                    "correlation": n.correlation, "log_slope": n.log_slope,
                    "log_correlation": n.log_correlation, "residual": n.residual} for n in s["nb"]],
    }


# ---- the experiment ---------------------------------------------------------------------------

def train_one(cfg: LayerBalanceConfig, ctx: RunContext, data: tuple[Tensor, Tensor], label: str,
              scale: float, optimizer: str, wd: float) -> History:
    import neurothermo.monitor as nt
    from neurothermo.train import train

    loss_fn = onehot_mse if cfg.loss == "mse" else nn.CrossEntropyLoss()
    model = build_model(data[0].shape[1], cfg, scale, ctx.seed)
    mon = nt.ThermoMonitor(model, loss_fn, every=cfg.record_every, noise_every=None)
    log_every = max(cfg.record_every, cfg.steps // 100)
    with ctx.progress(label, cfg.steps) as advance:
        def log(step: int, _model: nn.Module, loss: Tensor) -> None:
            advance(1)
            if step % log_every or step % cfg.record_every:
                return
            mon.flush()
            h = mon.history
            row = {"run": label, "loss": float(loss)}
            row.update({c: float(h.last(c)) for c in h.columns
                        if c.startswith(("grad_sq_ema/", "neuron_ratio/"))})
            ctx.log(step, **row)

        return train(model, loss_fn, data, optimizer=optimizer, lr=cfg.lr,
                        batch_size=None if optimizer == "gd" else cfg.batch_size, steps=cfg.steps,
                        weight_decay=wd, seed=ctx.seed, monitor=mon, callbacks=[log])


def run(cfg: LayerBalanceConfig, ctx: RunContext) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    try:
        _run(cfg, ctx)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: LayerBalanceConfig, ctx: RunContext) -> None:
    x, y, source = load_data(cfg)
    main_opt = cfg.optimizer
    runs: dict[str, History] = {}
    for s in cfg.init_scales:
        label = f"{main_opt.upper()} s={s:g}"
        runs[label] = train_one(cfg, ctx, (x, y), label, s, main_opt, 0.0)
    s0 = cfg.init_scales[0]
    same = f"GD s={s0:g}" if main_opt == "gd" else None  # the control is then a main run already
    runs["GD control"] = (runs[same] if same is not None
                          else train_one(cfg, ctx, (x, y), "GD control", s0, "gd", 0.0))
    runs["SGD + wd control"] = train_one(cfg, ctx, (x, y), "SGD + wd control", s0, "sgd",
                                         cfg.weight_decay)
    sums = {k: summarise(h, cfg, cfg.weight_decay if k == "SGD + wd control" else 0.0)
            for k, h in runs.items()}
    mains = [k for k in runs if k not in ("GD control", "SGD + wd control")]

    why_bal = ("THEORY §2: J' = J + η²gᵀAg exactly, so a stationary wd = 0 run has E[gᵀAg] = 0 at "
               "any η; tolerance 3 batch-means SE")
    for k in mains:
        lb, nbs = sums[k]["lb"], sums[k]["nb"]
        for i, loc in enumerate(lb.pairs):
            ctx.predict(f"layer balance, {k}, {loc}: Σ_u E[in] / Σ_u E[out] = 1",
                        lb.pair_ratio[i], 1.0, Z * lb.pair_ratio_se[i], why=why_bal)
        for nb in nbs:
            ctx.predict(f"neuron balance, {k}, {nb.location}: slope of E[out] on E[in] over units = 1",
                        nb.slope, 1.0, Z * nb.slope_se,
                        why=why_bal + " (per unit); SE of the slope over the blocks")
            if nb.log_slope is not None and nb.log_slope_se is not None:
                ctx.predict(f"neuron balance, {k}, {nb.location}: log–log slope over units = 1",
                            nb.log_slope, 1.0, Z * nb.log_slope_se,
                            why=why_bal + " (per unit: log E[out] = log E[in])")
    gd = runs["GD control"]
    for i, loc in zip(rescale_indices(gd), sums["GD control"]["lb"].pairs):
        moved, drop = charge_drift(gd, i)
        ctx.predict(f"GD control, {loc}: Σ_u J stays at its start (moves ≤ 2η(L₀ − L_T))",
                    moved, 0.0, 2 * cfg.lr * max(drop, 0.0), sense="at_most",
                    why="no gradient noise: J moves by η²ḡᵀAḡ ≤ η²‖ḡ‖² per step, and the descent lemma "
                        "gives Σ η‖ḡ‖² ≤ (L₀ − L_T)/(1 − ηλ/2) ≤ 2(L₀ − L_T) while ηλ_max ≤ 1")
    wd_lb, ref = sums["SGD + wd control"]["lb"], sums[mains[0]]["lb"]
    for i, loc in enumerate(wd_lb.pairs):
        band = Z * math.hypot(float(ref.pair_ratio_se[i]), float(wd_lb.pair_ratio_se[i]))
        ctx.predict(f"wd control, {loc}: ratio off balance by more than 3 SE (combined with {mains[0]})",
                    abs(float(wd_lb.pair_ratio[i]) - 1), band, 0.0, sense="at_least",
                    why="with wd the stationary condition is E[gᵀAg] = wd(2 − η·wd)E[J]/η ≠ 0 "
                        "(THEORY §2), so the ratio is not 1 where the wd = 0 run's is")
    for i, d in enumerate(sums["SGD + wd control"]["identity"]):
        ctx.predict(f"wd control, {wd_lb.pairs[i]}: Σ_u E[gᵀAg] = wd(2 − η·wd)·Σ_u E[J]/η",
                    d["imbalance"], d["predicted"], Z * d["diff_se"],
                    why="stationary mean of J' = (1 − η·wd)²J + η²gᵀAg (THEORY §2); 3 batch-means "
                        "SE of the per-step difference")

    ctx.record(data=source, input_dim=int(x.shape[1]), n_samples=int(x.shape[0]),
               widths=[int(x.shape[1]), *cfg.hidden, 10],
               runs={k: _record(v) for k, v in sums.items()},
               wd_identity=sums["SGD + wd control"]["identity"])
    _figure(cfg, ctx, runs, sums, source)


def _figure(cfg: LayerBalanceConfig, ctx: RunContext, runs: dict[str, History],
            sums: dict[str, dict[str, Any]], source: str) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    keys = list(runs)
    fig, axes = plt.subplots(2, len(keys) + 1, figsize=(3.6 * (len(keys) + 1), 7), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, k in enumerate(keys):
        h = runs[k]
        ax = axes[0, j]
        for li, layer in enumerate(h.meta["layers"]):
            col = names.grad_sq_ema(layer)
            ax.plot(h.steps(col), h[col], color=colors[li % len(colors)], label=f"Linear {layer}")
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step")
        if j == 0:
            ax.set_ylabel("E‖g_k‖² (EMA)")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for n_i, nb in enumerate(sums[k]["nb"]):
            ax.loglog(nb.energy_in, nb.energy_out, "o", ms=3, alpha=0.7,
                      color=colors[n_i % len(colors)], label=f"{nb.location}: slope {nb.slope:.2f}")
        lo, hi = ax.get_xlim()
        lo2, hi2 = ax.get_ylim()
        lim = (min(lo, lo2), max(hi, hi2))
        ax.plot(lim, lim, "k--", lw=1)
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("E[incoming energy] per unit")
        if j == 0:
            ax.set_ylabel("E[outgoing energy] per unit")
        ax.legend(fontsize=6)
    ax, axj = axes[0, -1], axes[1, -1]
    for j, k in enumerate(keys):
        h = runs[k]
        for i in rescale_indices(h):
            col = names.neuron_ratio(i)
            ax.plot(h.steps(col), h[col], color=colors[j % len(colors)], label=f"{k} ({names.sym(i)})")
            ch = h[names.charge(i)].sum(1)
            axj.plot(h.steps(names.charge(i)), ch, color=colors[j % len(colors)], label=k)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_title("Σ E[in] / Σ E[out] (EMA)", fontsize=10)
    ax.legend(fontsize=6)
    axj.set_title("charge Σ_u J_u", fontsize=10)
    axj.set_xlabel("step")
    axj.legend(fontsize=6)
    fig.suptitle(f"layer and neuron balance, η = {cfg.lr}, b = {cfg.batch_size}; {source}", fontsize=10)
    ctx.savefig(fig, "layer_balance")


EXPERIMENT = register(
    Experiment(
        name="layer-balance",
        title="SGD reaches layer and neuron gradient balance in a ReLU MLP; GD and wd do not (§2, Fig. 2)",
        config=LayerBalanceConfig,
        quick=LayerBalanceConfig(),
        full=LayerBalanceConfig(steps=40_000, record_every=2, n_blocks=20),
        run=run,
        cost="full: 4 runs × 40k steps, ~3.5 min on one core (MNIST 10k images: ~7 min, GD dominates)",
    )
)
