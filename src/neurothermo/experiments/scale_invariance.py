"""``scale-invariance``: a weight in front of a normalisation under SGD and weight decay (docs/theory.md §2).

Model ``f(x) = uᵀ tanh(√h·W x / ‖W‖_F)`` with a trainable ``W`` (h × d) and a fixed readout ``u``;
data ``x ~ N(0, I_d)``, ``y = f_teacher(x) + σε``; loss ``½(f − y)²`` mean-reduced over a batch of
``b``. The loss is invariant under ``W → cW``, so every gradient is orthogonal to ``W``
(``⟨W, g⟩ = 0``) and ``‖g(cW)‖ = ‖g(W)‖/c``. Weight decay in torch's convention (``wd``: the step is
``W − η(g + wd·W)``, penalty ``(wd/2)‖W‖²``, the paper's ``γ = wd/2``). One step then gives exactly

    ‖W'‖² = (1 − η·wd)²‖W‖² + η²‖g‖²,

so (1) with ``wd = 0`` the norm never decreases and grows by exactly ``η²‖g‖²`` per step; (2) with
``wd > 0`` the stationary state has ``E‖W‖² = η·E‖g‖²/(wd(2 − η·wd))``, and since
``‖g‖²‖W‖² = ‖ĝ‖²`` (the gradient at unit norm), ``‖W‖⁴ = η·E‖ĝ‖²/(wd(2 − η·wd))``:
(3) ``‖W‖ ∝ (η/wd)^¼`` over a grid of (η, wd) as far as ``E‖ĝ‖²`` is the same across it.

All chains (the grid and the ``wd = 0`` chains) run together, vectorised, in float64. Control, in the
run: gradient flow (RK4 of :func:`neurothermo.functional_flow` on a fixed batch, ``wd = 0``) keeps
``‖W‖`` constant. With a learning rate so small that SGD is close to gradient flow, nothing relaxes
in the run's time and the stationarity check must fail (the failing-control test).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from neurothermo.config import setting
from neurothermo.entropic import functional_flow
from neurothermo.experiments._common import loglog_slope, pyplot
from neurothermo.experiments._runs import bonferroni_z
from neurothermo.experiments.base import Experiment, RunContext, register


@dataclass(frozen=True)
class ScaleInvarianceConfig:
    d: int = setting(8, "input dimension", min=1, max=1024)
    hidden: int = setting(4, "h: rows of W (normalised together)", min=1, max=1024)
    batch_size: int = setting(8, "batch size b (fresh samples each step)", min=1, max=4096)
    noise: float = setting(1.0, "label-noise standard deviation σ", min=0.0)
    lrs: tuple[float, ...] = setting((0.05, 0.1, 0.2), "learning rates η of the grid", min=1e-8,
                                     max=1.0)
    wds: tuple[float, ...] = setting((0.02, 0.05, 0.1), "weight decays wd (torch convention) of "
                                     "the grid", min=1e-8, max=1.0)
    steps: int = setting(40_000, "SGD steps per chain", min=100)
    burn_in: float = setting(0.25, "fraction of the steps discarded before averaging", min=0.0,
                             max=0.9)
    n_blocks: int = setting(10, "blocks for the batch-means standard error", min=4, max=1000)
    gf_time: float = setting(20.0, "time of the gradient-flow control", min=1e-3)

    def check(self) -> None:
        if len(self.lrs) * len(self.wds) < 2:
            raise ValueError("the (η, wd) grid needs at least two points for the slope")


def net(W: Tensor, u: Tensor, x: Tensor) -> Tensor:
    """``uᵀ tanh(√h·W x/‖W‖_F)`` for chains: ``W`` (C, h, d), ``x`` (C, b, d) → (C, b)."""
    h = W.shape[-2]
    Wn = W / W.flatten(1).norm(dim=1)[:, None, None]
    return torch.tanh(math.sqrt(h) * x @ Wn.transpose(1, 2)) @ u


@dataclass(frozen=True)
class Chains:
    """Per step and chain: ``norm_sq`` = ‖W_t‖² (before the step), ``grad_sq`` = ‖g_t‖²."""

    lr: Tensor
    wd: Tensor
    norm_sq: Tensor   # (steps + 1, C)
    grad_sq: Tensor   # (steps, C)


def sgd_chains(cfg: ScaleInvarianceConfig, lr: Tensor, wd: Tensor, gen: torch.Generator,
               W0: Tensor, u: Tensor, teacher: Tensor,
               on_block: Callable[[int, Tensor], None] | None = None) -> Chains:
    """Run SGD with weight decay on all chains at once (chain c: ``lr[c]``, ``wd[c]``)."""
    C = len(lr)
    W = W0.expand(C, -1, -1).clone()
    norms, gsq = [W.flatten(1).pow(2).sum(1)], []
    for t in range(cfg.steps):
        x = torch.randn(C, cfg.batch_size, cfg.d, generator=gen, dtype=W.dtype)
        y = net(teacher.expand(C, -1, -1), u, x) + cfg.noise * torch.randn(
            C, cfg.batch_size, generator=gen, dtype=W.dtype)
        Wl = W.requires_grad_(True)
        loss = (0.5 * (net(Wl, u, x) - y) ** 2).mean(1).sum()   # chains are independent
        (g,) = torch.autograd.grad(loss, Wl)
        with torch.no_grad():
            W = W.detach() - lr[:, None, None] * (g + wd[:, None, None] * W.detach())
            gsq.append(g.flatten(1).pow(2).sum(1))
            norms.append(W.flatten(1).pow(2).sum(1))
        if on_block is not None and (t + 1) % 1000 == 0:
            on_block(t + 1, norms[-1])
    if not bool(torch.isfinite(norms[-1]).all()):
        raise FloatingPointError("SGD diverged; lower the learning rates")
    return Chains(lr, wd, torch.stack(norms), torch.stack(gsq))


def batch_means_se(q: np.ndarray, n_blocks: int) -> float:
    """Standard error of the mean of an autocorrelated series from ``n_blocks`` block means."""
    m = len(q) // n_blocks
    blocks = q[: m * n_blocks].reshape(n_blocks, m).mean(1)
    return float(blocks.std(ddof=1) / math.sqrt(n_blocks))


def run(cfg: ScaleInvarianceConfig, ctx: RunContext) -> None:
    gen = torch.Generator().manual_seed(ctx.seed)
    dt = torch.float64
    u = torch.randn(cfg.hidden, generator=gen, dtype=dt) / math.sqrt(cfg.hidden)
    teacher = torch.randn(1, cfg.hidden, cfg.d, generator=gen, dtype=dt)
    W0 = torch.randn(1, cfg.hidden, cfg.d, generator=gen, dtype=dt)
    W0 = W0 / W0.norm()
    grid = [(a, w) for a in cfg.lrs for w in cfg.wds]
    lr = torch.tensor([a for a, _ in grid] + list(cfg.lrs), dtype=dt)
    wd = torch.tensor([w for _, w in grid] + [0.0] * len(cfg.lrs), dtype=dt)
    with ctx.progress("SGD chains", cfg.steps) as advance:
        def on_block(step: int, n: Tensor) -> None:
            ctx.log(step, **{f"norm_sq_{i}": float(v) for i, v in enumerate(n)})
            advance(1000)

        ch = sgd_chains(cfg, lr, wd, gen, W0, u, teacher, on_block)
    nsq, gsq = ch.norm_sq.numpy(), ch.grad_sq.numpy()
    G = len(grid)
    # (1) wd = 0: the exact growth, to float64 round-off.
    lr0 = lr[G:].numpy()
    growth = np.diff(nsq[:, G:], axis=0)
    expect = lr0**2 * gsq[:, G:]
    scale = (np.sqrt(nsq[:-1, G:]) + lr0 * np.sqrt(gsq[:, G:])) ** 2
    eps = float(torch.finfo(dt).eps)
    worst = float(np.max(np.abs(growth - expect) / scale) / eps)
    n_entries = cfg.hidden * cfg.d
    ctx.predict("wd = 0: Δ‖W‖² − η²‖g‖² per step, in units of ε(‖W‖ + η‖g‖)²", worst, 0.0,
                4.0 * n_entries, sense="at_most",
                why="exact identity (⟨W, g⟩ = 0); float64 round-off of sums of h·d squares and of "
                    "the orthogonality, ≤ 4·h·d·ε relative")
    ctx.predict("wd = 0: ‖W‖² never decreases (min Δ‖W‖² / ε‖W‖²)",
                float(np.min(growth / nsq[:-1, G:]) / eps), 0.0, 4.0 * n_entries, sense="at_least",
                why="Δ = η²‖g‖² ≥ 0 up to the same round-off")
    # (2) stationarity on the grid: q_t = ‖W_t‖² − η²‖g_t‖²/a, a = η·wd(2 − η·wd), has mean 0.
    start = int(cfg.burn_in * cfg.steps)
    zs, w_eq, ghat = [], [], []
    for i, (a_lr, a_wd) in enumerate(grid):
        a = a_lr * a_wd * (2 - a_lr * a_wd)
        n_w, g_w = nsq[start:-1, i], gsq[start:, i]
        q = n_w - a_lr**2 * g_w / a
        se = batch_means_se(q, cfg.n_blocks)
        zs.append(abs(q.mean()) / se if se > 0 else float("inf"))
        w_eq.append(math.sqrt(n_w.mean()))
        ghat.append(float((n_w * g_w).mean()))       # E‖ĝ‖² = E[‖W‖²‖g‖²]
    crit = bonferroni_z(len(grid))
    ctx.predict("E‖W‖² = η·E‖g‖²/(wd(2 − η·wd)) at every grid point (max |z|, batch means)",
                float(max(zs)), 0.0, crit, sense="at_most",
                why=f"{len(grid)} tests of a zero mean with batch-means standard errors "
                    f"({cfg.n_blocks} blocks); Bonferroni threshold at family-wise level 1e-3")
    # (3) ‖W‖ ∝ (η/wd)^¼, with the exact factor: x = 2η/(wd(2 − η·wd)).
    x = np.array([2 * a / (w * (2 - a * w)) for a, w in grid])
    slope, se_fit = loglog_slope(x, np.array(w_eq))
    s_g, _ = loglog_slope(x, np.array(ghat))
    ctx.predict("‖W‖ ∝ (η/wd)^slope over the grid", slope, 0.25, 3 * se_fit + 0.25 * abs(s_g),
                why="‖W‖⁴ = η·E‖ĝ‖²/(wd(2 − η·wd)): the slope is ¼(1 + s_ĝ), s_ĝ the measured "
                    "log-log slope of E‖ĝ‖² across the grid; + 3 fit s.e.")
    # Control: gradient flow on a fixed batch keeps ‖W‖ (RK4 error estimated from two step sizes).
    xb = torch.randn(1, 256, cfg.d, generator=gen, dtype=dt)
    yb = net(teacher, u, xb) + cfg.noise * torch.randn(1, 256, generator=gen, dtype=dt)

    def loss_gf(p: dict[str, Tensor]) -> Tensor:
        return (0.5 * (net(p["W"], u, xb) - yb) ** 2).mean()

    ends = [functional_flow(loss_gf, {"W": W0}, time=cfg.gf_time, steps=s)["W"]
            for s in (100, 200)]
    rel = [abs(float(e.pow(2).sum()) - 1.0) for e in ends]   # ‖W0‖ = 1
    tol_gf = 2 * abs(rel[0] - rel[1]) + 1e3 * eps
    ctx.predict("control: gradient flow keeps ‖W‖² (relative change)", rel[1], 0.0, tol_gf,
                sense="at_most", control=True,
                why="RK4 error of the invariant, estimated as 2× the change between 100 and 200 "
                    "steps, + 1000ε")
    sgd_growth = float(lr0[-1] ** 2 * gsq[: int(cfg.gf_time / lr0[-1]), -1].sum())
    ctx.record(grid=[{"lr": a, "wd": w, "norm_eq": n, "ghat_sq": g, "z": z}
                     for (a, w), n, g, z in zip(grid, w_eq, ghat, zs)],
               slope=slope, slope_se=se_fit, ghat_slope=s_g, gf_relative_change=rel[1],
               sgd_growth_same_time=sgd_growth, wd0_final_norm_sq=nsq[-1, G:].tolist())
    _figure(cfg, ctx, ch, grid, x, np.array(w_eq), slope)


def _figure(cfg: ScaleInvarianceConfig, ctx: RunContext, ch: Chains, grid: list[tuple[float, float]],
            x: np.ndarray, w_eq: np.ndarray, slope: float) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    G = len(grid)
    steps = np.arange(ch.norm_sq.shape[0])
    for i, lr in enumerate(cfg.lrs):
        a1.plot(steps, ch.norm_sq[:, G + i].numpy(), label=f"wd = 0, η = {lr:g}")
    for i in range(G):
        a1.plot(steps, ch.norm_sq[:, i].numpy(), lw=0.6, alpha=0.7, color="gray",
                label="wd > 0 grid" if i == 0 else None)
    a1.set_yscale("log")
    a1.set_xlabel("SGD step")
    a1.set_ylabel("‖W‖²")
    a1.set_title("scale-invariant weight: growth without decay, equilibrium with it")
    a1.legend(fontsize=7)
    a2.loglog(x, w_eq, "o", label="SGD, time-averaged ‖W‖")
    ref = w_eq[0] * (x / x[0]) ** 0.25
    order = np.argsort(x)
    a2.loglog(x[order], ref[order], "k--", label="slope ¼ (theory)")
    a2.set_xlabel("2η / (wd(2 − η·wd))  ≈ η/wd")
    a2.set_ylabel("equilibrium ‖W‖")
    a2.set_title(f"fitted slope {slope:.3f}")
    a2.legend(fontsize=8)
    ctx.savefig(fig, "scale_invariance")


EXPERIMENT = register(
    Experiment(
        name="scale-invariance",
        title="Scale-invariant weights: ‖W‖² grows by η²‖g‖² per step without decay; with it "
              "E‖W‖² = η·E‖g‖²/(wd(2 − η·wd)), ‖W‖ ∝ (η/wd)^¼ (§2)",
        config=ScaleInvarianceConfig,
        quick=ScaleInvarianceConfig(steps=12_000),
        full=ScaleInvarianceConfig(),
        run=run,
        cost="full: 12 chains × 40k steps, ~21 s on one core",
    )
)
