"""``matrix-lr``: one preconditioned step is the Λ-flow of the entropic loss (docs/theory.md §1).

A step with a matrix learning rate ``θ' = θ − η·Λ·∇L`` (Adam or RMSProp with ``Λ = diag(1/(√v̂ + ε))``
frozen on the slow time scale, preconditioned SGD) equals, up to ``O(η³)``, the flow
``θ̇ = −Λ∇φ`` for time η of

    φ = L + (η/4)·∇Lᵀ Λ ∇L,

while the flow of ``L`` itself (``θ̇ = −Λ∇L``) is off by ``(η²/2)·ΛHΛ∇L = O(η²)``. Over a geometric
grid of η the log-log slope of the one-step error is 3 for φ and 2 for L. Λ is read by
:func:`neurothermo.preconditioner_from` from an Adam optimizer (β₁ = 0) after ``adam_steps`` steps on
the same loss, then frozen; the flows are :func:`neurothermo.functional_flow` (RK4).

Problems: ``smooth``, ``L(θ) = ½‖Aθ − c‖² + ¼Σθᵢ⁴`` (θ ∈ R⁶, fixed random A, c); ``mlp``, a tanh MLP
64 → 16 → 10 on a fixed batch of digits (mean-reduced cross-entropy). float64.

Tolerance: the errors are ``Cη^p(1 + aη + …)`` with ``|a| ≲ 2λ``, λ the top eigenvalue of
``Λ^½HΛ^½`` (the rate of the Λ-flow; power iteration), so the fitted slope is biased by at most
``x/(1 − x)`` with ``x = 2λη_max``; ``η_max`` is set from ``x_max`` (the run refuses x ≥ ⅓).
Control, in the run: the correction with the identity in place of Λ (``L + (η/4)‖∇L‖²`` flowed with
Λ) does not cancel the ``η²`` term — its slope stays 2. Run with ``correction=identity`` the
slope-3 check must fail.

Drift part (:mod:`.matrix_lr_drift`, settings ``drift_*``): an MLP trained with Adam (β₁ = 0), Λ
frozen there; the mean over many reshuffled epochs (N/b steps, batches without replacement) of
preconditioned SGD, minus the Λ-flow of L, against ``T·Λ·F_Λ`` with
``F_Λ = −(η/4)∇[∇LᵀΛ∇L + Tr(ΛΣ_B)]`` — size and direction within ``ε = ε_stat + Tλ_B`` (Monte-Carlo
error of the mean; the O(η³) remainder). Control: the plain force ``F_I`` in place of ``F_Λ``
(with ``correction=identity`` it is the main check and fails). Adam with its moving Λ is measured
only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from neurothermo.config import setting
from neurothermo.entropic import (
    Preconditioner,
    functional_entropic_loss,
    functional_flow,
    preconditioner_from,
)
from neurothermo.experiments._common import loglog_slope, pyplot
from neurothermo.experiments._runs import Objective, distance, problem, top_eigenvalue
from neurothermo.experiments.base import Experiment, RunContext, register
from neurothermo.experiments.matrix_lr_drift import drift_figure, matrix_lr_drift_check


@dataclass(frozen=True)
class MatrixLrConfig:
    problems: tuple[str, ...] = setting(("smooth", "mlp"), "losses: smooth (quadratic + quartic in "
                                        "R⁶) and/or mlp (digits)", choices=("smooth", "mlp"))
    adam_steps: int = setting(20, "Adam steps (β₁ = 0) before Λ is frozen", min=1, max=100_000)
    adam_lr: float = setting(0.01, "Adam learning rate of those steps", min=1e-6, max=1.0)
    x_max: float = setting(0.1, "2λη_max: sets the largest η from the top eigenvalue λ of Λ^½HΛ^½",
                           min=1e-4, max=0.33)
    n_lr: int = setting(5, "learning rates η_max/2^j in the slope fit", min=3, max=12)
    substeps: int = setting(4, "RK4 steps per flow of time η", min=1, max=1000)
    correction: Literal["lambda", "identity"] = setting(
        "lambda", "metric of the entropic correction in the main check: lambda (theory) or "
                  "identity (the control that must fail)", choices=("lambda", "identity"))
    drift: bool = setting(True, "also measure the drift of preconditioned SGD on an Adam-trained "
                                "MLP against the entropic force in Λ-geometry")
    drift_n_data: int = setting(256, "digits N of the drift part (one epoch = N/b steps)", min=4,
                                max=1797)
    drift_batch: int = setting(32, "batch size b of the drift part (divides N; without replacement)",
                               min=1, max=1797)
    drift_hidden: int = setting(16, "hidden width of the tanh MLP 64 → h → 10", min=1, max=1024)
    drift_train_steps: int = setting(300, "Adam steps (β₁ = 0, lr 0.01, b, with replacement) before "
                                          "Λ is frozen", min=1, max=100_000)
    drift_x: tuple[float, ...] = setting((0.05,), "epoch times T = mη as multiples x = Tλ of the Λ-flow "
                                                  "time scale 1/λ", min=1e-4, max=0.5)
    drift_replicates: int = setting(8000, "independent reshuffled epochs averaged per η", min=10,
                                    max=10_000_000)


def adam_preconditioner(model: nn.Module, f: Objective, cfg: MatrixLrConfig) -> Preconditioner:
    """Λ of Adam (β₁ = 0) after ``adam_steps`` steps on ``f`` (the model is moved by them)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.adam_lr, betas=(0.0, 0.999))
    for _ in range(cfg.adam_steps):
        opt.zero_grad()
        torch.autograd.backward(f(dict(model.named_parameters())))
        opt.step()
    return preconditioner_from(opt, model)


def one_step_errors(f: Objective, theta: dict[str, Tensor], pre: Preconditioner,
                    lrs: np.ndarray, substeps: int) -> dict[str, np.ndarray]:
    """‖step − flow‖ for the plain loss, φ with Λ, and φ with the identity (flowed with Λ)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    g = dict(zip(leaves, torch.autograd.grad(f(leaves), list(leaves.values()))))
    out: dict[str, list[float]] = {"plain": [], "lambda": [], "identity": []}
    for lr in map(float, lrs):
        step = {k: (v - lr * pre.diag[k] * g[k]).detach() for k, v in theta.items()}
        plain = functional_flow(f, theta, time=lr, steps=substeps, preconditioner=pre)
        ent = functional_flow(f, theta, time=lr, steps=substeps, lr=lr, preconditioner=pre)

        def f_id(p: Any, lr: float = lr) -> Tensor:
            return functional_entropic_loss(f, p, lr=lr)

        ident = functional_flow(f_id, theta, time=lr, steps=substeps, preconditioner=pre)
        out["plain"].append(distance(plain, step))
        out["lambda"].append(distance(ent, step))
        out["identity"].append(distance(ident, step))
    return {k: np.array(v) for k, v in out.items()}


def run(cfg: MatrixLrConfig, ctx: RunContext) -> None:
    results = {}
    for name in ctx.track(cfg.problems, "problems"):
        model, f = problem(name, ctx.seed)
        pre = adam_preconditioner(model, f, cfg)
        theta = {k: v.detach().clone() for k, v in model.named_parameters()}
        lam = top_eigenvalue(f, theta, dict(pre.diag))
        lr_max = cfg.x_max / (2 * lam)
        lrs = lr_max / 2.0 ** np.arange(cfg.n_lr)
        err = one_step_errors(f, theta, pre, lrs, cfg.substeps)
        for j, lr in enumerate(lrs):
            ctx.log(j, problem=name, lr=float(lr), **{f"error_{k}": float(v[j]) for k, v in err.items()})
        tol = cfg.x_max / (1 - cfg.x_max)
        why = (f"next-order term (1 + aη), |a| ≲ 2λ, λ = {lam:.3g} the top eigenvalue of Λ^½HΛ^½: "
               f"slope bias ≤ x/(1−x), x = 2λη_max = {cfg.x_max}")
        s = {k: loglog_slope(lrs, v)[0] for k, v in err.items()}
        ctx.predict(f"{name}: slope of ‖flow of L − step‖ vs η", s["plain"], 2.0, tol, why=why)
        ctx.predict(f"{name}: slope of ‖Λ-flow of L + (η/4)∇LᵀΛ∇L − step‖ vs η"
                    + (" [correction with the identity]" if cfg.correction == "identity" else ""),
                    s[cfg.correction], 3.0, tol, why=why)
        ctx.predict(f"{name} control: with the identity in place of Λ the η² term stays (slope)",
                    s["identity"], 2.0, tol, control=True,
                    why=why + "; the identity correction cancels ½ηΛHg, not ½ηΛHΛg")
        results[name] = (lrs, err, s, lam)
    drift = matrix_lr_drift_check(cfg, ctx) if cfg.drift else None
    ctx.record(**{name: {"lrs": r[0].tolist(), "top_eigenvalue": r[3],
                         **{f"error_{k}": v.tolist() for k, v in r[1].items()},
                         **{f"slope_{k}": v for k, v in r[2].items()}} for name, r in results.items()})
    _figure(ctx, results)
    if drift is not None:
        ctx.record(drift=drift)
        drift_figure(ctx, drift)


def _figure(ctx: RunContext, results: dict[str, Any]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    style = {"plain": ("o-", "tab:red", "flow of L"), "lambda": ("s-", "tab:blue", "Λ-flow of φ (Λ)"),
             "identity": ("^--", "tab:gray", "control: φ with I")}
    for ax, (name, (lrs, err, s, _)) in zip(axes[0], results.items()):
        for k, (fmt, color, label) in style.items():
            ax.loglog(lrs, err[k], fmt, color=color, label=f"{label} (slope {s[k]:.2f})")
        for p, k in ((2, "plain"), (3, "lambda")):
            ax.loglog(lrs, err[k][-1] * (lrs / lrs[-1]) ** p, ":", color="black", alpha=0.5)
        ax.set_xlabel("learning rate η")
        ax.set_ylabel("‖θ − ηΛ∇L − flow(η)‖")
        ax.set_title(f"{name}: Adam's Λ, reference slopes 2 and 3")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ctx.savefig(fig, "matrix_lr")


EXPERIMENT = register(
    Experiment(
        name="matrix-lr",
        title="A matrix-learning-rate step θ − ηΛ∇L is the Λ-flow of L + (η/4)∇LᵀΛ∇L to O(η³) "
              "(Adam's Λ; §1)",
        config=MatrixLrConfig,
        quick=MatrixLrConfig(n_lr=4),
        full=MatrixLrConfig(n_lr=7, substeps=8, drift_x=(0.0125, 0.025, 0.05, 0.1, 0.2, 0.4)),
        run=run,
        cost="full: 2 problems × 7 learning rates × 3 RK4 flows, and 6 epoch times × 8000 "
             "reshuffled epochs of the drift part, ~33 s on one core",
    )
)
