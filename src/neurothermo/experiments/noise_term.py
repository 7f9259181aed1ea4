"""``noise-term``: the noise term of the entropic loss on real networks (docs/theory.md §1).

Averaged over minibatches ``B`` of ``b`` samples, the entropic loss of one SGD step is

    E_B φ_η = L + (η/4)‖∇L‖² + (η/4)·Tr Σ_B,
    Tr Σ_B = Tr Σ / b                       (batches drawn with replacement),
    Tr Σ_B = Tr Σ·(N − b)/(b(N − 1))        (without replacement),

because ``E_B‖g_B‖² = ‖∇L‖² + Tr Σ_B`` (``g_B`` the mean-reduced minibatch gradient, ``Tr Σ`` the
population trace of the per-sample gradient covariance). A digits MLP and a small CNN (float64,
mean-reduced cross-entropy, N samples of scikit-learn's digits) are trained by SGD; at several points
along training :func:`neurothermo.entropic_decomposition` gives the noise term exactly, and a
Monte-Carlo average over ``mc_batches`` sampled minibatches measures it independently:
``(η/4)(mean_B ‖g_B‖² − ‖∇L‖²)``, with standard error ``(η/4)·sd(‖g_B‖²)/√K``.

Checked: (1) every Monte-Carlo estimate agrees with the decomposition (max |z| under a Bonferroni
threshold at family-wise level 10⁻³); (2) the noise is there (the excesses, pooled by Stouffer's
method, are positive at level 10⁻³); (3) with replacement ``Tr Σ_B`` falls as ``b^−1`` (log-log slope −1). Control, in the
run: minibatches of the whole dataset drawn without replacement (full-batch GD) have no noise term —
every ``g_B`` equals ``∇L`` up to round-off. Run with ``batch_sizes=N`` and ``samplings=without``
the "noise is there" check must fail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from neurothermo.config import setting
from neurothermo.entropic import entropic_decomposition
from neurothermo.experiments._common import loglog_slope, pyplot
from neurothermo.experiments._runs import bonferroni_z, digits_subset
from neurothermo.experiments.base import Experiment, RunContext, register
from neurothermo.models import mlp
from neurothermo.train import train

Sampling = Literal["with", "without"]


@dataclass(frozen=True)
class NoiseTermConfig:
    models: tuple[str, ...] = setting(("mlp", "cnn"), "networks: mlp (64→32→10, tanh) and/or cnn "
                                      "(conv 3×3, 4 channels → linear)", choices=("mlp", "cnn"))
    n_data: int = setting(512, "N: digits used as the whole dataset", min=2, max=1797)
    lr: float = setting(0.1, "SGD learning rate η (training and the entropic loss)", min=1e-6, max=10.0)
    train_batch: int = setting(32, "batch size of the SGD training run", min=1, max=1797)
    checkpoints: tuple[int, ...] = setting((0, 100, 400), "SGD steps after which the noise term is "
                                           "measured (increasing)", min=0, max=1_000_000)
    batch_sizes: tuple[int, ...] = setting((2, 8, 32, 128), "minibatch sizes b of the measurement",
                                           min=1, max=1797)
    samplings: tuple[Sampling, ...] = setting(("with", "without"), "minibatch sampling: with and/or "
                                              "without replacement", choices=("with", "without"))
    mc_batches: int = setting(400, "K: sampled minibatches per Monte-Carlo estimate", min=2,
                              max=1_000_000)

    def check(self) -> None:
        if list(self.checkpoints) != sorted(set(self.checkpoints)):
            raise ValueError(f"checkpoints must increase strictly, got {self.checkpoints}")
        if "without" in self.samplings and max(self.batch_sizes) > self.n_data:
            raise ValueError(f"batch size {max(self.batch_sizes)} > n_data={self.n_data} cannot be "
                             "drawn without replacement; lower it or use samplings=with")


def build(name: str, seed: int) -> nn.Module:
    """The two networks, float64: ``mlp`` 64→32→10 (tanh) or ``cnn`` conv(1→4, 3×3) → ReLU → linear."""
    torch.manual_seed(seed)
    if name == "mlp":
        return mlp([64, 32, 10], "tanh").double()
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(256, 10)).double()


def batch_grad_sq(model: nn.Module, x: Tensor, y: Tensor, idx: Tensor, chunk: int = 64) -> Tensor:
    """``‖∇l_B‖²`` for each row of ``idx`` (K × b sample indices), mean-reduced cross-entropy."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    per = vmap(grad(loss_of), in_dims=(None, 0, 0))
    out = []
    for s in range(0, len(idx), chunk):
        rows = idx[s:s + chunk]
        g = per(params, x[rows], y[rows])
        out.append(sum((gi.reshape(len(rows), -1) ** 2).sum(1) for gi in g.values()))
    return torch.cat(out)


def draw(n: int, b: int, k: int, sampling: str, gen: torch.Generator) -> Tensor:
    """K minibatches of b indices out of n, uniformly with or without replacement."""
    if sampling == "with":
        return torch.randint(n, (k, b), generator=gen)
    return torch.argsort(torch.rand(k, n, generator=gen), dim=1)[:, :b]


@dataclass(frozen=True)
class Measurement:
    """One (model, step, b, sampling) cell: the exact noise term and its Monte-Carlo estimate."""

    model: str
    step: int
    b: int
    sampling: str
    exact: float       # (η/4) Tr Σ_B from entropic_decomposition
    mc: float          # (η/4)(mean ‖g_B‖² − ‖∇L‖²)
    se: float          # its standard error (Monte-Carlo ⊕ round-off floor)
    trace_sigma: float

    @property
    def z(self) -> float:
        return (self.mc - self.exact) / self.se if self.se > 0 else float("nan")

    @property
    def z_present(self) -> float:
        return self.mc / self.se if self.se > 0 else float("nan")


def measure(cfg: NoiseTermConfig, model: nn.Module, name: str, step: int, x: Tensor, y: Tensor,
            gen: torch.Generator) -> list[Measurement]:
    model.eval()
    out = []
    for sampling in cfg.samplings:
        for b in cfg.batch_sizes:
            dec = entropic_decomposition(model, F.cross_entropy, (x, y), lr=cfg.lr,
                                            batch_size=b, replacement=sampling == "with")
            sq = batch_grad_sq(model, x, y, draw(len(y), b, cfg.mc_batches, sampling, gen))
            excess = float(sq.mean()) - dec.grad_norm_sq
            # float64 round-off of the difference mean‖g_B‖² − ‖∇L‖² (two sums computed in
            # different orders) enters the standard error as a floor: 1000·ε·mean_i‖g_i‖².
            roundoff = 1000 * torch.finfo(x.dtype).eps * (dec.trace_sigma + dec.grad_norm_sq)
            se = math.hypot(float(sq.std()) / math.sqrt(len(sq)), roundoff)
            out.append(Measurement(name, step, b, sampling, dec.noise, cfg.lr / 4 * excess,
                                   cfg.lr / 4 * se, dec.trace_sigma))
    return out


def full_batch_control(model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[float, float]:
    """Whole-dataset batches without replacement: max |‖g_B‖² − ‖∇L‖²| over 4 orders, and the
    round-off scale ``1000·ε·mean_i ‖g_i‖²`` it is compared with."""
    n = len(y)
    sq = batch_grad_sq(model, x, y, draw(n, n, 4, "without", gen), chunk=1)
    ref = batch_grad_sq(model, x, y, torch.arange(n)[None])
    per_sample = batch_grad_sq(model, x, y, torch.arange(n)[:, None], chunk=256)
    return float((sq - ref).abs().max()), 1000 * torch.finfo(x.dtype).eps * float(per_sample.mean())


def run(cfg: NoiseTermConfig, ctx: RunContext) -> None:
    x, y = digits_subset(cfg.n_data, ctx.seed)
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    cells: list[Measurement] = []
    controls = {}
    for name in cfg.models:
        model = build(name, ctx.seed)
        done = 0
        for step in ctx.track(cfg.checkpoints, f"{name}: train and measure"):
            if step > done:
                train(model, F.cross_entropy, (x, y), lr=cfg.lr, batch_size=cfg.train_batch,
                         steps=step - done, seed=ctx.seed + step)
                done = step
            new = measure(cfg, model, name, step, x, y, gen)
            for m in new:
                ctx.log(step, model=name, b=m.b, sampling=m.sampling, noise_exact=m.exact,
                        noise_mc=m.mc, noise_se=m.se)
            cells += new
        controls[name] = full_batch_control(model, x, y, gen)
    _predict(cfg, ctx, cells, controls)
    _figure(cfg, ctx, cells)


def _predict(cfg: NoiseTermConfig, ctx: RunContext, cells: list[Measurement],
             controls: dict[str, tuple[float, float]]) -> None:
    crit_two = bonferroni_z(len(cells))
    for name in cfg.models:
        mine = [m for m in cells if m.model == name]
        zs = np.array([m.z for m in mine])
        worst = float(np.max(np.abs(zs))) if np.all(np.isfinite(zs)) else float("nan")
        ctx.predict(f"{name}: Monte-Carlo noise term vs entropic_decomposition (max |z|)", worst, 0.0,
                    crit_two, sense="at_most",
                    why=f"{len(cells)} Monte-Carlo means of K={cfg.mc_batches} batches, each z ~ N(0,1) "
                        "by the CLT; Bonferroni threshold at family-wise level 1e-3")
        zp = np.array([m.z_present for m in mine])
        stouffer = float(zp.sum() / math.sqrt(len(zp))) if np.all(np.isfinite(zp)) else float("nan")
        ctx.predict(f"{name}: the noise term is present (Stouffer z of the excesses E‖g_B‖² − ‖∇L‖²)",
                    stouffer, float(NormalDist().inv_cdf(1 - 1e-3)), 0.0, sense="at_least",
                    why="Σz/√m is N(0,1) if there were no excess; one-sided threshold at level 1e-3")
        last = max(m.step for m in mine)
        pts = sorted((m.b, m.mc, m.se) for m in mine if m.step == last and m.sampling == "with")
        if len(pts) >= 2 and all(p[1] > 0 for p in pts):
            b, v, se = (np.array(c, dtype=float) for c in zip(*pts))
            slope, se_fit = loglog_slope(b, v)
            lx = np.log(b) - np.log(b).mean()
            se_mc = float(np.sqrt(((lx * se / v) ** 2).sum()) / (lx**2).sum())
            ctx.predict(f"{name}: Tr Σ_B ∝ b^slope with replacement", slope, -1.0,
                        4 * math.hypot(se_fit, se_mc),
                        why="4 × (fit s.e. ⊕ Monte-Carlo s.e. propagated through the fit: "
                            "Σ lx_i·(se_i/v_i) / Σ lx_i²)")
        diff, scale = controls[name]
        ctx.predict(f"{name} control: whole-dataset batches have no noise (|‖g_B‖² − ‖∇L‖²|)", diff,
                    0.0, scale, sense="at_most", control=True,
                    why="the same N samples in another order: only float64 round-off, bounded by "
                        "1000·ε·mean‖g_i‖²")
    ctx.record(cells=[{"model": m.model, "step": m.step, "b": m.b, "sampling": m.sampling,
                       "noise_exact": m.exact, "noise_mc": m.mc, "noise_se": m.se,
                       "trace_sigma": m.trace_sigma} for m in cells],
               full_batch_control={k: {"max_diff": v[0], "roundoff_scale": v[1]}
                                   for k, v in controls.items()})


def _figure(cfg: NoiseTermConfig, ctx: RunContext, cells: list[Measurement]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(cfg.models), figsize=(5.2 * len(cfg.models), 8), squeeze=False)
    n = cfg.n_data
    for j, name in enumerate(cfg.models):
        ax = axes[0, j]
        last = max(m.step for m in cells if m.model == name)
        mine = [m for m in cells if m.model == name and m.step == last]
        tr = mine[0].trace_sigma
        bs = np.array(sorted(set(cfg.batch_sizes)), dtype=float)
        grid = np.geomspace(bs.min(), bs.max(), 100)
        for sampling, color in (("with", "tab:blue"), ("without", "tab:red")):
            pts = sorted((m.b, m.mc, m.se) for m in mine if m.sampling == sampling)
            if not pts:
                continue
            b, v, se = (np.array(c, dtype=float) for c in zip(*pts))
            ax.errorbar(b, 4 / cfg.lr * v, yerr=4 / cfg.lr * 2 * se, fmt="o", color=color,
                        label=f"Monte-Carlo, {sampling} replacement (±2 s.e.)")
            factor = 1 / grid if sampling == "with" else (n - grid) / (grid * (n - 1))
            ax.plot(grid, tr * factor, color=color, lw=1,
                    label="Tr Σ / b" if sampling == "with" else "Tr Σ (N − b)/(b(N − 1))")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size b")
        ax.set_ylabel("Tr Σ_B = E‖g_B‖² − ‖∇L‖²")
        ax.set_title(f"{name}, after {last} SGD steps (N = {n})")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        b0 = min(cfg.batch_sizes, key=lambda b: abs(b - cfg.train_batch))
        for sampling, color in (("with", "tab:blue"), ("without", "tab:red")):
            hist = sorted((m.step, m.exact, m.mc, m.se) for m in cells
                          if m.model == name and m.b == b0 and m.sampling == sampling)
            if not hist:
                continue
            s, ex, mc, se = (np.array(c, dtype=float) for c in zip(*hist))
            ax.plot(s, ex, "-", color=color, label=f"entropic_decomposition ({sampling})")
            ax.errorbar(s, mc, yerr=2 * se, fmt="o", color=color, label=f"Monte-Carlo ({sampling})")
        ax.set_xlabel("SGD step")
        ax.set_ylabel(f"noise term (η/4) Tr Σ_B, b = {b0}")
        ax.legend(fontsize=7)
    fig.suptitle(f"the noise term of E_B φ_η, η = {cfg.lr}, K = {cfg.mc_batches} batches")
    ctx.savefig(fig, "noise_term")


EXPERIMENT = register(
    Experiment(
        name="noise-term",
        title="The noise term (η/4)Tr Σ_B of the entropic loss on a digits MLP and CNN: exact vs "
              "Monte-Carlo, 1/b and (N−b)/(b(N−1)) (§1)",
        config=NoiseTermConfig,
        quick=NoiseTermConfig(checkpoints=(0, 100), mc_batches=200),
        full=NoiseTermConfig(),
        run=run,
        cost="full: 2 networks × 3 checkpoints × 8 (b, sampling) cells × 400 batches, ~9 s on one core",
    )
)
