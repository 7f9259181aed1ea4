"""``momentum``: heavy-ball momentum follows a modified loss to one order more (docs/theory.md §1).

Heavy ball in torch's form (dampening 0): ``v ← βv + ∇L``, ``θ ← θ − ηv``. To leading order it is
gradient flow with time step ``η/(1 − β)`` (``θ̇ = −Λ∇F`` with ``Λ = 1/(1 − β)`` for time η per step)
on the modified loss (Ghosh et al. 2023)

    F = L + η(1 + β)/(4(1 − β)²)·‖∇L‖²,

which is :func:`neurothermo.preconditioner_from` of ``torch.optim.SGD(momentum=β)``: ``Λ = 1/(1 − β)``,
``c = (1 + β)/(1 − β)`` in ``F = L + c(η/4)∇LᵀΛ∇L``. Over a fixed time ``T`` (``K ≈ T(1 − β)/η``
full-batch steps) the distance between the heavy-ball iterate and the flow of F is ``O(η²)``; the
flow of L alone is off by ``O(η)``. The velocity starts at its steady value ``v₀ = ∇L(θ₀)/(1 − β)``
(torch's first buffer ``v = ∇L`` lags by ``ηβ/(1 − β)²·∇L``, an ``O(η)`` offset; the run records the
slope with that start too). Problems: the smooth loss and the digits MLP of ``matrix-lr``; float64;
flows by :func:`neurothermo.functional_flow` (RK4).

Checked for each β: slope 1 without the correction, slope 2 with it (tolerance ``x/(1 − x)``,
``x = 2λη_max/(1 − β)`` with λ the top Hessian eigenvalue: the next-order term of the expansion);
and the coefficient — the best-fitting multiple ``κ`` of the literature coefficient (least squares
of the end point, linear in the coefficient to leading order) — must be 1, within twice its change
between the two smallest η (its own O(η) remainder). Control: the correction switched off
(``correction_scale=0``) must fail the slope-2 check; in the run the plain flow's slope 1 is the
control check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from neurothermo.config import setting
from neurothermo.entropic import functional_flow, preconditioner_from
from neurothermo.experiments._common import loglog_slope, pyplot
from neurothermo.experiments._runs import Objective, distance, problem, top_eigenvalue
from neurothermo.experiments.base import Experiment, RunContext, register


@dataclass(frozen=True)
class MomentumConfig:
    problems: tuple[str, ...] = setting(("smooth", "mlp"), "losses (as in matrix-lr)",
                                        choices=("smooth", "mlp"))
    betas: tuple[float, ...] = setting((0.0, 0.5, 0.9), "momenta β", min=0.0, max=0.99)
    x_max: float = setting(0.1, "2λη_max/(1 − β): sets the largest η per β", min=1e-4, max=0.33)
    n_lr: int = setting(4, "learning rates η_max/2^j in the slope fit", min=3, max=10)
    horizon: float = setting(4.0, "total time T in units of 1/λ", min=0.1, max=1000.0)
    substeps: int = setting(2, "RK4 steps per heavy-ball step", min=1, max=100)
    correction_scale: float = setting(1.0, "multiplies the literature coefficient: 1 is the theory, "
                                           "0 the control that must fail", min=0.0, max=10.0)


def heavy_ball(f: Objective, theta: dict[str, Tensor], lr: float, beta: float, steps: int,
               matched: bool = True) -> dict[str, Tensor]:
    """``steps`` full-batch heavy-ball steps (torch's form); ``matched``: ``v₀ = ∇L/(1 − β)``,
    otherwise torch's first buffer ``v₁ = ∇L``."""
    th = dict(theta)
    v: dict[str, Tensor] | None = None
    for _ in range(steps):
        leaves = {k: t.detach().requires_grad_(True) for k, t in th.items()}
        g = dict(zip(leaves, torch.autograd.grad(f(leaves), list(leaves.values()))))
        if v is None:
            v = {k: g[k] / (1 - beta) if matched else g[k] for k in g}
        else:
            v = {k: beta * v[k] + g[k] for k in g}
        th = {k: (th[k] - lr * v[k]).detach() for k in th}
    return th


def modified_flow(f: Objective, theta: dict[str, Tensor], lr: float, beta: float, steps: int,
                  substeps: int, scale: float) -> dict[str, Tensor]:
    """Flow ``θ̇ = −Λ∇F`` for time ``steps·lr`` with SGD(momentum=β)'s Λ and ``c`` (``scale·c``)."""
    holder = torch.nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(holder.parameters(), lr=lr, momentum=beta) if beta > 0 else \
        torch.optim.SGD(holder.parameters(), lr=lr)
    pre = preconditioner_from(opt, holder)
    lam = float(pre.diag["weight"])
    kwargs: dict[str, Any] = {}
    if scale > 0:
        kwargs["lr"] = scale * pre.correction * lr
    flowed: dict[str, Tensor] = functional_flow(f, theta, time=steps * lr, steps=steps * substeps,
                                                preconditioner=lam, **kwargs)
    return flowed


def run(cfg: MomentumConfig, ctx: RunContext) -> None:
    rows = []
    for name in cfg.problems:
        model, f = problem(name, ctx.seed)
        theta = {k: v.detach().clone() for k, v in model.named_parameters()}
        lam = top_eigenvalue(f, theta, {k: torch.ones(()) for k in theta})
        T = cfg.horizon / lam
        for beta in ctx.track(cfg.betas, f"{name}: momenta"):
            lrs = cfg.x_max * (1 - beta) / (2 * lam) / 2.0 ** np.arange(cfg.n_lr)
            d: dict[str, list[float]] = {"plain": [], "corrected": [], "torch_start": []}
            kappa = []
            for lr in map(float, lrs):
                K = max(1, round(T * (1 - beta) / lr))
                hb = heavy_ball(f, theta, lr, beta, K)
                plain = modified_flow(f, theta, lr, beta, K, cfg.substeps, 0.0)
                lit = modified_flow(f, theta, lr, beta, K, cfg.substeps, 1.0)
                corr = lit if cfg.correction_scale == 1.0 else modified_flow(
                    f, theta, lr, beta, K, cfg.substeps, cfg.correction_scale)
                d["plain"].append(distance(plain, hb))
                d["corrected"].append(distance(corr, hb))
                d["torch_start"].append(distance(lit, heavy_ball(f, theta, lr, beta, K, False)))
                # end point ≈ plain + κ·(lit − plain): least-squares κ
                delta = {k: lit[k] - plain[k] for k in theta}
                num = sum(float(((hb[k] - plain[k]) * delta[k]).sum()) for k in theta)
                kappa.append(num / distance(lit, plain) ** 2)
                ctx.log(None, problem=name, beta=beta, lr=lr, steps=K,
                        **{f"distance_{k}": v[-1] for k, v in d.items()})
            rows.append((name, beta, lrs, {k: np.array(v) for k, v in d.items()}, kappa))
            x = cfg.x_max
            tol = x / (1 - x)
            why = (f"next-order term (1 + aη), |a| ≲ 2λ/(1 − β), λ = {lam:.3g}: slope bias ≤ "
                   f"x/(1−x), x = {x}")
            s = {k: loglog_slope(lrs, v)[0] for k, v in rows[-1][3].items()}
            label = f"{name}, β = {beta:g}"
            ctx.predict(f"{label}: slope of ‖heavy ball − flow of F‖ vs η"
                        + ("" if cfg.correction_scale == 1.0 else f" [×{cfg.correction_scale:g}]"),
                        s["corrected"], 2.0, tol, why=why)
            ctx.predict(f"{label} control: without the correction the distance is O(η) (slope)",
                        s["plain"], 1.0, tol, control=True, why=why)
            ctx.predict(f"{label}: fitted coefficient / η(1+β)/(4(1−β)²)", kappa[-1], 1.0,
                        max(2 * abs(kappa[-1] - kappa[-2]), 1e-6),
                        why="its O(η) remainder: twice the change between the two smallest η")
    ctx.record(runs=[{"problem": n, "beta": b, "lrs": lrs.tolist(),
                      **{f"distance_{k}": v.tolist() for k, v in d.items()},
                      **{f"slope_{k}": loglog_slope(lrs, v)[0] for k, v in d.items()},
                      "coefficient_ratio": kap} for n, b, lrs, d, kap in rows])
    _figure(cfg, ctx, rows)


def _figure(cfg: MomentumConfig, ctx: RunContext, rows: list[Any]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cfg.problems), figsize=(5.8 * len(cfg.problems), 4.6),
                             squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(cfg.betas)))
    for ax, name in zip(axes[0], cfg.problems):
        for (_n, beta, lrs, d, _), c in zip([r for r in rows if r[0] == name], colors):
            ax.loglog(lrs, d["plain"], "o--", color=c, label=f"β = {beta:g}: flow of L")
            ax.loglog(lrs, d["corrected"], "s-", color=c, label=f"β = {beta:g}: flow of F")
            ax.loglog(lrs, d["corrected"][-1] * (lrs / lrs[-1]) ** 2, ":", color="black", alpha=0.4)
            ax.loglog(lrs, d["plain"][-1] * (lrs / lrs[-1]), ":", color="gray", alpha=0.4)
        ax.set_xlabel("learning rate η")
        ax.set_ylabel("‖θ_heavy-ball − θ_flow‖ at fixed time")
        ax.set_title(f"{name}: O(η) without, O(η²) with the correction (dotted: slopes 1, 2)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    ctx.savefig(fig, "momentum")


EXPERIMENT = register(
    Experiment(
        name="momentum",
        title="Heavy-ball momentum is the flow of L + η(1+β)/(4(1−β)²)‖∇L‖² with time step "
              "η/(1−β), to O(η²) (§1)",
        config=MomentumConfig,
        quick=MomentumConfig(problems=("smooth",), n_lr=3),
        full=MomentumConfig(n_lr=5),
        run=run,
        cost="full: 2 problems × 3 momenta × 5 learning rates, ~2 min on one core",
    )
)
