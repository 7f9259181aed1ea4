"""``entropic-flow``: the paper's Figure 1 (docs/theory.md §1, §5.1).

On a smooth, non-quadratic 2-D loss ``L``, compare one GD step of size η with ``n`` steps of size
η/n taken (a) on ``L`` itself and (b) on the corrected loss

    F_n(θ) = L(θ) + (η/4)(1 − 1/n)‖∇L(θ)‖².

Backward error analysis predicts ``‖n steps on L − big step‖ = (η²/2)(1 − 1/n)‖H∇L‖ + O(η³)``
(log-log slope 2) and ``‖n steps on F_n − big step‖ = O(η³)`` (slope 3). The experiment fits both
slopes over a range of η, checks the leading coefficient of the plain error against the closed form,
and draws the trajectories with the entropic force ``−(∇F_n − ∇L) = −(η/2)(1 − 1/n)·H∇L`` as a vector
field over the loss contours. Everything runs in float64 (the O(η³) errors reach ~1e-10).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from neurothermo.config import setting
from neurothermo.experiments._common import loglog_slope, pyplot
from neurothermo.experiments.base import Experiment, RunContext, register

LossName = Literal["banana", "wells"]


def banana_loss(theta: Tensor) -> Tensor:
    """``L(x, y) = ½(1 − x)² + (y − x²)²``: a mild Rosenbrock valley, minimum at (1, 1)."""
    x, y = theta[..., 0], theta[..., 1]
    return 0.5 * (1 - x) ** 2 + (y - x**2) ** 2


def wells_loss(theta: Tensor) -> Tensor:
    """``L(x, y) = log(1 + (x² − 1)²) + ½(y − ½ sin 2x)²``: two curved wells at x = ±1."""
    x, y = theta[..., 0], theta[..., 1]
    return torch.log1p((x**2 - 1) ** 2) + 0.5 * (y - 0.5 * torch.sin(2 * x)) ** 2


LOSSES: dict[str, Callable[[Tensor], Tensor]] = {"banana": banana_loss, "wells": wells_loss}


def grad_of(f: Callable[[Tensor], Tensor], theta: Tensor, *, create_graph: bool = False) -> Tensor:
    """∇f at ``theta`` (a 1-D tensor)."""
    t = theta if theta.requires_grad else theta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(t), t, create_graph=create_graph)
    return g


def corrected_loss(f: Callable[[Tensor], Tensor], lr: float, n: int) -> Callable[[Tensor], Tensor]:
    """``F_n = f + (lr/4)(1 − 1/n)‖∇f‖²`` as a differentiable function of θ (the engine's
    :func:`neurothermo.functional_entropic_loss`)."""
    from neurothermo.entropic import functional_entropic_loss

    def F(theta: Tensor) -> Tensor:
        return functional_entropic_loss(f, theta, lr=lr, n_steps=n)

    return F


def gd(f: Callable[[Tensor], Tensor], theta: Tensor, lr: float, steps: int) -> Tensor:
    """``steps`` GD steps of size ``lr`` on ``f``; returns the path, shape (steps + 1, 2)."""
    path = [theta.detach()]
    for _ in range(steps):
        path.append((path[-1] - lr * grad_of(f, path[-1])).detach())
    return torch.stack(path)


def step_errors(
    f: Callable[[Tensor], Tensor], theta0: Tensor, lr: float, n: int
) -> tuple[float, float]:
    """Distance of n steps of size lr/n on f, and on F_n, from one step of size lr on f."""
    big = gd(f, theta0, lr, 1)[-1]
    plain = gd(f, theta0, lr / n, n)[-1]
    corr = gd(corrected_loss(f, lr, n), theta0, lr / n, n)[-1]
    return float(torch.linalg.norm(plain - big)), float(torch.linalg.norm(corr - big))


@dataclass(frozen=True)
class EntropicFlowConfig:
    loss: LossName = setting("banana", "the 2-D loss", choices=("banana", "wells"))
    x0: float = setting(-0.8, "start, first coordinate", min=-3.0, max=3.0)
    y0: float = setting(1.4, "start, second coordinate", min=-3.0, max=3.0)
    n_steps: int = setting(2, "n: small steps of size lr/n replacing one big step", min=2, max=1000)
    lr_min: float = setting(1e-3, "smallest learning rate of the slope fit", min=1e-6, max=1.0)
    lr_max: float = setting(2e-2, "largest learning rate of the slope fit", min=1e-6, max=1.0)
    n_lr: int = setting(8, "number of learning rates (log-spaced) in the fit", min=3, max=200)
    figure_lr: float = setting(0.15, "learning rate of the trajectories drawn", min=1e-4, max=1.0)
    figure_steps: int = setting(8, "big steps drawn in the trajectory figure", min=1, max=500)

    def check(self) -> None:
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min}) must be < lr_max ({self.lr_max})")


# Slopes of adjacent orders differ by exactly 1; the fitted slope is biased by the next-order term,
# e(η) = cη^p(1 + aη + …) gives a local slope p + aη, with |a| of order the largest curvature along the
# path (λ ≲ 10 for the default start), so over η ≤ 0.02 the bias is ≲ 0.2. A tolerance of 0.25 stays
# below ½, so an O(η²) error can never pass as O(η³) or the reverse.
SLOPE_TOL = 0.25


def run(cfg: EntropicFlowConfig, ctx: RunContext) -> None:
    f = LOSSES[cfg.loss]
    theta0 = torch.tensor([cfg.x0, cfg.y0], dtype=torch.float64)
    n = cfg.n_steps
    lrs = np.geomspace(cfg.lr_min, cfg.lr_max, cfg.n_lr)
    plain_err, corr_err = [], []
    for lr in ctx.track(lrs, "step errors vs learning rate"):
        e_plain, e_corr = step_errors(f, theta0, float(lr), n)
        plain_err.append(e_plain)
        corr_err.append(e_corr)
        ctx.log(lr=float(lr), error_plain=e_plain, error_corrected=e_corr)
    plain = np.array(plain_err)
    corr = np.array(corr_err)
    if not (np.all(plain > 0) and np.all(corr > 0)):
        raise FloatingPointError("an error is exactly zero: the start is a stationary point")

    s_plain, se_plain = loglog_slope(lrs, plain)
    s_corr, se_corr = loglog_slope(lrs, corr)
    ctx.predict("slope plain (n steps on L vs one step)", s_plain, 2.0, SLOPE_TOL,
                why="error (η²/2)(1−1/n)‖H∇L‖ + O(η³); next-order slope bias ≲ λ·η_max")
    ctx.predict("slope corrected (n steps on F_n vs one step)", s_corr, 3.0, SLOPE_TOL,
                why="F_n cancels the η² term; next-order slope bias ≲ λ·η_max")

    # Leading coefficient of the plain error at the smallest η, against the closed form.
    g = grad_of(f, theta0)
    t = theta0.detach().requires_grad_(True)
    (Hg,) = torch.autograd.grad(grad_of(f, t, create_graph=True), t, grad_outputs=g)
    coef_pred = 0.5 * (1 - 1 / n) * float(torch.linalg.norm(Hg))
    coef_meas = plain[0] / lrs[0] ** 2
    ctx.predict("plain error / η² at smallest η vs (1/2)(1−1/n)‖H∇L‖", coef_meas, coef_pred,
                10 * cfg.lr_min * max(1.0, float(torch.linalg.norm(Hg) / torch.linalg.norm(g))),
                relative=True,
                why="relative O(η) correction; bound 10·η_min·max(1, ‖H∇L‖/‖∇L‖)")
    ctx.record(
        lrs=lrs.tolist(), error_plain=plain.tolist(), error_corrected=corr.tolist(),
        slope_plain=s_plain, slope_plain_se=se_plain,
        slope_corrected=s_corr, slope_corrected_se=se_corr,
        halving_ratio_corrected=float(corr[-1] / np.interp(lrs[-1] / 2, lrs, corr)),
    )
    _figure(cfg, ctx, f, theta0, lrs, plain, corr, (s_plain, s_corr))


def _figure(cfg: EntropicFlowConfig, ctx: RunContext, f: Callable[[Tensor], Tensor],
            theta0: Tensor, lrs: np.ndarray, plain: np.ndarray, corr: np.ndarray,
            slopes: tuple[float, float]) -> None:
    plt = pyplot()

    lr, n, K = cfg.figure_lr, cfg.n_steps, cfg.figure_steps
    big = gd(f, theta0, lr, K).numpy()
    small_plain = gd(f, theta0, lr / n, n * K).numpy()
    small_corr = gd(corrected_loss(f, lr, n), theta0, lr / n, n * K).numpy()

    pts = np.concatenate([big, small_plain, small_corr])
    lo, hi = pts.min(0) - 0.4, pts.max(0) + 0.4
    xs, ys = np.linspace(lo[0], hi[0], 160), np.linspace(lo[1], hi[1], 160)
    X, Y = np.meshgrid(xs, ys)
    grid = torch.tensor(np.stack([X, Y], -1), dtype=torch.float64)
    Z = f(grid).numpy()
    # entropic force field −(∇F_n − ∇L) = −(η/2)(1 − 1/n) H∇L on a coarse grid
    qx, qy = np.linspace(lo[0], hi[0], 17), np.linspace(lo[1], hi[1], 17)
    QX, QY = np.meshgrid(qx, qy)
    from neurothermo.entropic import functional_entropic_force

    # −(∇F_n − ∇L) = −(η/2)(1 − 1/n)·H∇L: the loss is a sum over grid points, so one
    # Hessian-vector product on the stacked grid gives every point's force at once.
    pts_grid = torch.tensor(np.stack([QX, QY], -1), dtype=torch.float64)
    force = functional_entropic_force(lambda t: f(t).sum(), pts_grid, lr=lr, n_steps=n).numpy()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    ax.contour(X, Y, np.log1p(Z), levels=25, cmap="Greys", linewidths=0.7)
    ax.quiver(QX, QY, force[..., 0], force[..., 1], color="tab:green", alpha=0.7,
              label="entropic force −(∇F_n − ∇L)")
    ax.plot(big[:, 0], big[:, 1], "o-", color="black", label=f"GD, step η = {lr}")
    ax.plot(small_plain[:, 0], small_plain[:, 1], ".-", color="tab:red",
            label=f"{n} steps of η/{n} on L")
    ax.plot(small_corr[:, 0], small_corr[:, 1], ".--", color="tab:blue",
            label=f"{n} steps of η/{n} on F_n")
    ax.set_title(f"{cfg.loss} loss: trajectories and entropic force")
    ax.set_xlabel("θ₁")
    ax.set_ylabel("θ₂")
    ax.legend(fontsize=8, loc="best")

    bx.loglog(lrs, plain, "o-", color="tab:red", label=f"on L (slope {slopes[0]:.2f}, theory 2)")
    bx.loglog(lrs, corr, "s-", color="tab:blue", label=f"on F_n (slope {slopes[1]:.2f}, theory 3)")
    bx.set_xlabel("learning rate η")
    bx.set_ylabel("‖n small steps − one big step‖")
    bx.set_title("error against the big step")
    bx.legend()
    bx.grid(True, which="both", alpha=0.3)
    ctx.savefig(fig, "entropic_flow")


EXPERIMENT = register(
    Experiment(
        name="entropic-flow",
        title="One big GD step vs n small steps on L and on the entropic loss F_n (Fig. 1)",
        config=EntropicFlowConfig,
        quick=EntropicFlowConfig(n_lr=6),
        full=EntropicFlowConfig(n_lr=24, figure_steps=16),
        run=run,
        cost="full: ~5 s on one CPU core",
    )
)
