"""``sgd-vs-entropic-flow``: SGD is gradient flow on the entropic loss, to one order more (docs/theory.md §1).

A small MLP on scikit-learn's digits is trained by SGD with learning rate η for a fixed total time
``T = K·η`` over a fixed sequence of minibatches in *time*: batch ``B_m`` is used during the window
``[mτ, (m+1)τ)``, ``τ = lr_max``, so at ``η = τ/2^j`` it serves ``2^j`` consecutive SGD steps. Every
learning rate thus sees the same data at the same times and the limit η → 0 is one trajectory;
only the discretisation changes with η. (With a fresh batch for every step, different η would
average different batches and the slope would carry that sampling noise, ~0.2 for K ≈ 10.)
Alongside, from the same start and over the same batches, two continuous trajectories are
integrated (RK4, ``substeps`` steps per SGD step), each step's batch for time η:

* gradient flow on the plain minibatch loss ``l_{B_k}``: local error ``O(η²)`` per step, so after
  ``K = T/η`` steps the distance to SGD is ``O(η)``;
* gradient flow on the entropic loss ``φ_η = l_{B_k} + (η/4)‖∇l_{B_k}‖²``: local error ``O(η³)``,
  distance ``O(η²)``.

The log-log slopes of the final distance against η (fitted over ``n_lr`` halvings of η) are the
checked predictions 1 and 2. Tolerance: the errors are ``Cη^p(1 + aη + …)`` with ``|a|`` of the
order of the top minibatch-Hessian eigenvalue λ (measured on the first batches), so the fitted
slope is biased by at most ``x/(1 − x)``, ``x = 2λη_max`` (a factor 2 of margin); the run refuses
settings where that exceeds ½, since then a slope of 1 and one of 2 could not be told apart.
Everything runs in float64 (the entropic distances reach ~1e-8).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from neurothermo.config import setting
from neurothermo.entropic import functional_flow
from neurothermo.experiments._common import loglog_slope, pyplot
from neurothermo.experiments.base import Experiment, RunContext, register

Activation = Literal["tanh", "gelu", "relu"]


@dataclass(frozen=True)
class SgdVsEntropicFlowConfig:
    hidden: int = setting(32, "hidden width of the MLP 64 → hidden → 10", min=1, max=4096)
    activation: Activation = setting("tanh", "activation (smooth ones keep the expansion clean)",
                                     choices=("tanh", "gelu", "relu"))
    batch_size: int = setting(32, "minibatch size (drawn without replacement from 1,797 digits)",
                              min=1, max=1797)
    lr_max: float = setting(0.05, "largest learning rate η; the others are η/2, η/4, …",
                            min=1e-4, max=1.0)
    n_lr: int = setting(4, "number of learning rates (halvings) in the slope fit", min=3, max=10)
    base_steps: int = setting(16, "minibatches = SGD steps at the largest η; total time "
                                  "T = base_steps·lr_max", min=1, max=10_000)
    substeps: int = setting(2, "RK4 steps per SGD step (integration error O((η/substeps)⁴))",
                            min=1, max=100)
    entropic_scale: float = setting(1.0, "multiplies the entropic term (η/4)‖∇l‖²: 1 is the "
                                         "theory; 0 (plain flow) or 2 are controls that must fail "
                                         "the slope-2 check", min=0.0, max=10.0)
    n_curvature_batches: int = setting(4, "first minibatches whose top Hessian eigenvalue sets "
                                          "the slope tolerance", min=1, max=100)


def _distance(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def run(cfg: SgdVsEntropicFlowConfig, ctx: RunContext) -> None:
    # The model is tiny: intra-op threads only add synchronisation (10× slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(cfg, ctx)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: SgdVsEntropicFlowConfig, ctx: RunContext) -> None:
    from neurothermo.curvature import top_eigenvalues
    from neurothermo.data import load_digits
    from neurothermo.models import mlp

    dtype = torch.float64
    x, y = load_digits(dtype)
    n = x.shape[0]
    torch.manual_seed(ctx.seed)
    model = mlp([x.shape[1], cfg.hidden, 10], cfg.activation).to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    lrs = cfg.lr_max / 2.0 ** np.arange(cfg.n_lr)
    steps = [cfg.base_steps * 2**j for j in range(cfg.n_lr)]
    batches = [torch.randperm(n, generator=gen)[:cfg.batch_size] for _ in range(cfg.base_steps)]
    total_time = cfg.base_steps * cfg.lr_max

    lam = max(float(top_eigenvalues(model, loss_fn, (x[i], y[i])).values[0])
              for i in batches[:cfg.n_curvature_batches])
    a_eta = 2.0 * lam * cfg.lr_max
    tol = a_eta / (1.0 - a_eta) if a_eta < 1 else math.inf
    if tol >= 0.5:
        raise ValueError(
            f"lr_max={cfg.lr_max} is too large for the slope test: top minibatch Hessian eigenvalue "
            f"{lam:.3g} gives a next-order slope bias up to {tol:.2f} >= 0.5; lower lr_max"
        )
    tol = max(tol, 0.05)

    def objective(i: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
        xb, yb = x[i], y[i]
        return lambda p: loss_fn(functional_call(model, p, (xb,)), yb)

    final_plain, final_entropic, curves = [], [], []
    for j, (lr, k_steps) in enumerate(zip(lrs, ctx.track(steps, "learning rates"))):
        lr = float(lr)
        sgd, plain, entropic = dict(theta0), dict(theta0), dict(theta0)
        d_plain, d_entropic = [], []
        for k in range(k_steps):
            f = objective(batches[k // 2**j])  # batch of the time window [mτ, (m+1)τ)
            leaves = {a: v.detach().requires_grad_(True) for a, v in sgd.items()}
            grads = torch.autograd.grad(f(leaves), list(leaves.values()))
            sgd = {a: (v - lr * g).detach() for (a, v), g in zip(leaves.items(), grads)}
            plain = functional_flow(f, plain, time=lr, steps=cfg.substeps)
            entropic = functional_flow(f, entropic, time=lr, steps=cfg.substeps,
                                       lr=cfg.entropic_scale * lr if cfg.entropic_scale else None)
            d_plain.append(_distance(plain, sgd))
            d_entropic.append(_distance(entropic, sgd))
            ctx.log(step=k + 1, lr=lr, time=(k + 1) * lr, distance_plain=d_plain[-1],
                    distance_entropic=d_entropic[-1])
        final_plain.append(d_plain[-1])
        final_entropic.append(d_entropic[-1])
        curves.append((lr, d_plain, d_entropic))

    fp, fe = np.array(final_plain), np.array(final_entropic)
    if not (np.all(fp > 0) and np.all(fe > 0)):
        raise FloatingPointError("a distance is exactly zero; the start is a stationary point")
    s_plain, se_plain = loglog_slope(lrs, fp)
    s_entropic, se_entropic = loglog_slope(lrs, fe)
    why = (f"next-order term (1 + aη), |a| ≲ 2λ = {2 * lam:.3g} (top minibatch Hessian "
           f"eigenvalue λ): fitted-slope bias ≤ x/(1−x), x = 2λ·η_max")
    ctx.predict("slope of ‖plain flow − SGD‖ vs η at fixed T", s_plain, 1.0, tol, why=why)
    ctx.predict("slope of ‖entropic flow − SGD‖ vs η at fixed T", s_entropic, 2.0, tol, why=why)
    ctx.record(lrs=lrs.tolist(), steps=steps, total_time=total_time,
               distance_plain=fp.tolist(), distance_entropic=fe.tolist(),
               slope_plain=s_plain, slope_plain_se=se_plain,
               slope_entropic=s_entropic, slope_entropic_se=se_entropic,
               top_batch_hessian_eigenvalue=lam, slope_tolerance=tol,
               ratio_entropic_to_plain_smallest_lr=float(fe[-1] / fp[-1]))
    _figure(ctx, curves, lrs, fp, fe, (s_plain, s_entropic), total_time)


def _figure(ctx: RunContext, curves: list[tuple[float, list[float], list[float]]], lrs: np.ndarray,
            fp: np.ndarray, fe: np.ndarray, slopes: tuple[float, float], total_time: float) -> None:
    from matplotlib.ticker import NullFormatter

    plt = pyplot()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(curves)))
    for (lr, dp, de), c in zip(curves, colors):
        t = lr * np.arange(1, len(dp) + 1)
        ax.semilogy(t, dp, "-", color=c, label=f"η = {lr:.3g}: plain flow")
        ax.semilogy(t, de, "--", color=c, label=f"η = {lr:.3g}: entropic flow")
    ax.set_xlabel("time t = kη")
    ax.set_ylabel("‖flow − SGD‖")
    ax.set_title("distance to the SGD trajectory (same batches)")
    ax.legend(fontsize=7, ncol=2)
    bx.loglog(lrs, fp, "o-", color="tab:red", label=f"plain flow (slope {slopes[0]:.2f}, theory 1)")
    bx.loglog(lrs, fe, "s-", color="tab:blue",
              label=f"entropic flow (slope {slopes[1]:.2f}, theory 2)")
    bx.loglog(lrs, fp[-1] * lrs / lrs[-1], ":", color="tab:red", alpha=0.6)
    bx.loglog(lrs, fe[-1] * (lrs / lrs[-1]) ** 2, ":", color="tab:blue", alpha=0.6)
    bx.xaxis.set_minor_formatter(NullFormatter())
    bx.set_xticks(lrs, [f"{v:.3g}" for v in lrs])
    bx.set_xlabel("learning rate η")
    bx.set_ylabel(f"‖flow − SGD‖ at T = {total_time:.3g}")
    bx.set_title("O(η) for gradient flow, O(η²) for the entropic flow")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend()
    ctx.savefig(fig, "sgd_vs_entropic_flow")


EXPERIMENT = register(
    Experiment(
        name="sgd-vs-entropic-flow",
        title="SGD vs gradient flow on the plain and on the entropic loss (digits MLP)",
        config=SgdVsEntropicFlowConfig,
        quick=SgdVsEntropicFlowConfig(),
        full=SgdVsEntropicFlowConfig(n_lr=6, base_steps=32, substeps=4),
        run=run,
        cost="quick: ~5 s, full: ~1-2 min on one CPU core",
    )
)
