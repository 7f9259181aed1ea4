"""``platonic-nonlinear``: tanh and ReLU MLPs on two views align more under label-noise SGD than GD.

Two MLPs of different nonlinearity, depth and width (A: tanh, B: ReLU, biases on) see views
``x_A = x`` and ``x_B = Zx`` (Z invertible) of the same data, ``x ~ N(0, Σ_x)``, with labels
``y = V*x + ε``, ``ε ~ N(0, Σ_ε)`` drawn afresh at every step (online SGD, batch b, MSE averaged
over the batch, η annealed geometrically, no weight decay). Every chain (seed) of A is paired
with the chain of B of the same index, and all conditions start from the same initialisations.

Prediction: the noise SGD injects at the minimum (the label noise) drives the representations
to a noise-determined equilibrium that forgets the initialisation, while full-batch GD on the
noise-free loss ends at an initialisation-dependent minimum. So the cross-network alignment of
hidden layers (linear CKA on held-out inputs, averaged over the layer × layer map) is higher after
label-noise SGD than after GD from the same start, and higher than at initialisation. Tolerance:
the paired per-chain differences' mean must exceed ``z_sigma`` standard errors (std/√C): with C = 8
chains, ``t ≥ 3`` has probability ≈ 1 % (7 degrees of freedom) when there is no effect, less with
more chains.
Controls: SGD without label noise (mini-batch noise only, which vanishes at an interpolating
minimum) must NOT beat GD; the untrained nets are the baseline.

Why a teacher and narrow nets: the mechanism needs gradient noise at the minimum, which a
teacher with label noise provides in a controlled way; in narrow nets the initial charges
(‖incoming‖² − ‖outgoing‖² per unit) are of order one, so GD's init-dependence is visible. On
scikit-learn digits with 64–96-wide nets and one-hot targets plus label noise, SGD did not beat
GD (CKA ≈ 0.75 vs 0.78 in a 6000-step run; see docs/experiments/platonic.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.config import setting
from neurothermo.experiments._common import pyplot
from neurothermo.experiments._linear_nets import well_conditioned
from neurothermo.experiments._mlp_chains import ACTIVATIONS, Params, forward, init_mlp, mse_step
from neurothermo.experiments.base import Experiment, RunContext, register

KINDS = ("init", "GD", "SGD, no label noise", "SGD")


@dataclass(frozen=True)
class PlatonicNonlinearConfig:
    sigma_x: tuple[float, ...] = setting((2.0, 1.5, 1.0, 0.5), "diagonal of the input covariance Σ_x",
                                         min=1e-6)
    sigma_eps: tuple[float, ...] = setting((1.0, 0.75, 0.5, 0.25), "diagonal of the label-noise Σ_ε",
                                           min=0.0)
    teacher: tuple[float, ...] = setting((1.5, 1.2, 1.0, 0.7), "singular values of V* (random rotations)",
                                         min=0.0)
    act_a: str = setting("tanh", "net A's nonlinearity", choices=tuple(ACTIVATIONS))
    widths_a: tuple[int, ...] = setting((4, 8, 8, 4), "net A: input, hidden widths, output", min=1)
    act_b: str = setting("relu", "net B's nonlinearity", choices=tuple(ACTIVATIONS))
    widths_b: tuple[int, ...] = setting((4, 12, 12, 12, 4), "net B: input, hidden widths, output", min=1)
    lr_start: float = setting(0.02, "SGD learning rate at the start", min=1e-6, max=1.0)
    lr_end: float = setting(0.004, "SGD learning rate at the end (geometric annealing)", min=1e-6, max=1.0)
    steps: int = setting(20_000, "online SGD steps", min=1)
    batch_size: int = setting(4, "batch size b", min=1)
    chains: int = setting(8, "independent initialisations per net (paired A_c with B_c)", min=3, max=256)
    init_scale: float = setting(1.0, "init std × √fan_in", min=1e-6)
    gd_lr: float = setting(0.05, "learning rate of the full-batch GD control", min=1e-6, max=1.0)
    gd_steps: int = setting(2000, "steps of the GD control", min=0)
    gd_samples: int = setting(1000, "fixed inputs of the GD control (noise-free labels V*x)", min=10)
    test_samples: int = setting(400, "held-out inputs for the alignment", min=10)
    z_sigma: float = setting(3.0, "paired differences must exceed this many standard errors", min=0.0)

    def check(self) -> None:
        d = len(self.sigma_x)
        for name in ("sigma_eps", "teacher"):
            if len(getattr(self, name)) != d:
                raise ValueError(f"{name} must have the data dimension {d} (the length of sigma_x)")
        for name, w in (("widths_a", self.widths_a), ("widths_b", self.widths_b)):
            if len(w) < 3 or w[0] != d or w[-1] != d:
                raise ValueError(f"{name} must start and end with the data dimension {d} and have "
                                 f"at least one hidden layer, got {w}")
        if not any(s > 0 for s in self.sigma_eps):
            raise ValueError("sigma_eps is all zero: the label-noise SGD run would be the no-noise control; "
                             "give some label noise")


def _cross_maps(ha: list[Tensor], hb: list[Tensor]) -> Tensor:
    """Linear CKA of every (A layer, B layer) pair per chain: ``(C, L_A, L_B)``; NaN if diverged."""
    from neurothermo.alignment import cka

    C = ha[0].shape[0]
    out = torch.full((C, len(ha), len(hb)), float("nan"), dtype=torch.float64)
    for c in range(C):
        for i, a in enumerate(ha):
            for j, b in enumerate(hb):
                ok = bool(torch.isfinite(a[c]).all() & torch.isfinite(b[c]).all())
                # a dead or constant layer has no CKA: leave NaN (the prediction then fails)
                if ok and bool(a[c].std(0).max() > 0) and bool(b[c].std(0).max() > 0):
                    out[c, i, j] = cka(a[c], b[c])
    return out


def run(cfg: PlatonicNonlinearConfig, ctx: RunContext) -> None:
    g = torch.Generator().manual_seed(ctx.seed)
    dt = torch.float64
    d, C = len(cfg.sigma_x), cfg.chains
    sx = torch.tensor(cfg.sigma_x, dtype=dt).sqrt()
    se = torch.tensor(cfg.sigma_eps, dtype=dt).sqrt()
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    V = q1 @ torch.diag(torch.tensor(cfg.teacher, dtype=dt)) @ q2
    x_gd = torch.randn(cfg.gd_samples, d, generator=g, dtype=dt) * sx
    x_test = torch.randn(cfg.test_samples, d, generator=g, dtype=dt) * sx
    views = {"A": torch.eye(d, dtype=dt), "B": well_conditioned(d, g)}
    nets = {"A": (cfg.act_a, cfg.widths_a), "B": (cfg.act_b, cfg.widths_b)}
    ratio = cfg.lr_end / cfg.lr_start
    noise = torch.cat([torch.ones(C, dtype=dt), torch.zeros(C, dtype=dt)])  # SGD | SGD, no label noise
    hidden: dict[str, dict[str, list[Tensor]]] = {k: {} for k in KINDS}
    for name, (act, widths) in nets.items():
        z = views[name]
        init = init_mlp(widths, C, cfg.init_scale, g)
        params: Params = [(W.repeat(2, 1, 1), b.repeat(2, 1, 1)) for W, b in init]
        block = max(cfg.steps // 20, 1)
        with ctx.progress(f"SGD, net {name} ({act})", cfg.steps) as advance:
            for t in range(cfg.steps):
                lr = cfg.lr_start * ratio ** (t / max(cfg.steps - 1, 1))
                x = torch.randn(2 * C, cfg.batch_size, d, generator=g, dtype=dt) * sx
                eps = torch.randn(2 * C, cfg.batch_size, d, generator=g, dtype=dt) * se
                y = x @ V.T + noise[:, None, None] * eps
                params = mse_step(params, x @ z.T, y, act, lr)
                if (t + 1) % block == 0:
                    ctx.log(t + 1, net=name, lr=lr)
                    advance(block)
        gd = init
        for _ in ctx.track(range(cfg.gd_steps), f"GD, net {name}"):
            gd = mse_step(gd, x_gd @ z.T, x_gd @ V.T, act, cfg.gd_lr)
        with torch.no_grad():
            _, hs = forward(params, x_test @ z.T, act)
            hidden["SGD"][name] = [h[:C] for h in hs]
            hidden["SGD, no label noise"][name] = [h[C:] for h in hs]
            hidden["GD"][name] = forward(gd, x_test @ z.T, act)[1]
            hidden["init"][name] = forward(init, x_test @ z.T, act)[1]
            for kind, p in (("SGD", [(W[:C], b[:C]) for W, b in params]), ("GD", gd)):
                err = (forward(p, x_test @ z.T, act)[0] - x_test @ V.T).square().sum(-1).mean()
                ctx.record(**{f"test_mse_{kind}_{name}": float(err)})

    maps = {k: _cross_maps(hidden[k]["A"], hidden[k]["B"]) for k in KINDS}
    score = {k: m.mean(dim=(1, 2)) for k, m in maps.items()}  # per chain: mean over layer pairs

    def paired(a: str, b: str) -> tuple[float, float]:
        diff = score[a] - score[b]
        return float(diff.mean()), float(diff.std() / math.sqrt(C))

    why = (f"paired over {C} chains; {cfg.z_sigma:g} standard errors (std/√C): the 1 % one-sided t "
           f"quantile is 3.0 for 7 degrees of freedom and smaller for more ({C - 1} here)")
    results = {}
    for a, b, expect in (("SGD", "GD", True), ("SGD", "init", True), ("SGD, no label noise", "GD", False)):
        m, s = paired(a, b)
        results[f"{a} − {b}"] = {"mean": m, "se": s}
        if expect:
            ctx.predict(f"{a} above {b}: mean cross-network CKA gain ≥ {cfg.z_sigma:g} s.e.", m,
                        cfg.z_sigma * s, 0.0, sense="at_least",
                        why="label noise drives both nets to a noise-set equilibrium that forgets the init; "
                            + why)
        else:
            ctx.predict(f"{a} NOT above {b} (gain < {cfg.z_sigma:g} s.e.)", m, cfg.z_sigma * s, 0.0,
                        sense="at_most",
                        why="without label noise the gradient noise vanishes at the minimum, so nothing "
                            "erases the initial charges; " + why)
    ctx.record(
        cross_cka_mean={k: m.nanmean(0).tolist() for k, m in maps.items()},
        cross_cka_per_chain={k: v.tolist() for k, v in score.items()},
        paired_differences=results,
    )
    _figure(cfg, ctx, maps, score)


def _figure(cfg: PlatonicNonlinearConfig, ctx: RunContext, maps: dict[str, Tensor],
            score: dict[str, Tensor]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(KINDS) + 1, figsize=(5 * (len(KINDS) + 1), 4.3))
    ax = axes[0]
    for c in range(cfg.chains):
        ax.plot(range(len(KINDS)), [float(score[k][c]) for k in KINDS], "-o", color="gray", alpha=0.5, ms=3)
    ax.plot(range(len(KINDS)), [float(score[k].mean()) for k in KINDS], "-o", color="black", lw=2,
            label="mean over chains")
    ax.set_xticks(range(len(KINDS)), [k.replace(", ", ",\n") for k in KINDS], fontsize=8)
    ax.set_ylabel("cross-network CKA, mean over layer pairs")
    ax.set_title(f"A ({cfg.act_a}) vs B ({cfg.act_b}), paired chains")
    ax.legend(fontsize=8)
    for ax, kind in zip(axes[1:], KINDS):
        m = maps[kind].nanmean(0).numpy()
        im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(m.shape[1]), [f"B:h{j + 1}" for j in range(m.shape[1])])
        ax.set_yticks(range(m.shape[0]), [f"A:h{i + 1}" for i in range(m.shape[0])])
        ax.set_title(f"{kind}\ncross-network linear CKA (mean of {cfg.chains})", fontsize=9)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if m[i, j] > 0.6 else "white")
        fig.colorbar(im, ax=ax)
    ctx.savefig(fig, "platonic_nonlinear")


EXPERIMENT = register(
    Experiment(
        name="platonic-nonlinear",
        title="tanh and ReLU MLPs on two views align more under label-noise SGD than under GD",
        config=PlatonicNonlinearConfig,
        quick=PlatonicNonlinearConfig(steps=12_000, gd_steps=1500),
        full=PlatonicNonlinearConfig(steps=40_000, chains=16, gd_steps=4000),
        run=run,
        cost="full: 2 nets × 2 × 16 chains × 40k SGD steps + GD, ~1.5 min on one core",
    )
)
