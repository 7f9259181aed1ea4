"""``platonic-linear``: embedded deep linear nets on two views learn one kernel, and the ways it breaks.

Nets ``f(x) = M_out·W_D ⋯ W_1·M_in·x`` of different depths and widths see different views
``x_A = x``, ``x_B = Z x`` of the same data, ``x ~ N(0, Σ_x)``, with common labels ``y = V*x + ε``,
``ε ~ N(0, Σ_ε)`` independent of x. Loss ``½‖f − y‖²`` averaged over a batch of b (the ½ and the
mean only rescale η). Online SGD (fresh samples every step), torch-style weight decay ``wd``
(``W ← W − η(g + wd·W)``, i.e. γ = wd/2), η annealed geometrically from ``lr_start`` to ``lr_end``.

Prediction: with label noise and no weight decay, SGD's noise drives the matrix charges
``W_kW_kᵀ − W_{k+1}ᵀW_{k+1}`` (conserved by gradient flow) to the values where the noise injected
on both sides balances; then every hidden layer of either net has Gram ``h(x₁)ᵀh(x₂) ∝ x₁ᵀK*x₂``,

    K* = Σ_x^{-1/2} (Σ_x^{1/2} V*ᵀ Σ_ε V* Σ_x^{1/2})^{1/2} Σ_x^{-1/2},

whatever the depth, width, ``M_in``, ``M_out`` and view. Each breaking condition is run from the
same initialisations, with its own prediction (kernels in :mod:`._linear_nets`): no label noise
(no noise at the minimum: the charges freeze, init-dependent); weight decay (charges → 0: the
layer-dependent balanced kernel ``M_inᵀ(PᵀP)^{k/D}M_in``); labels ``Ty`` for net B with
non-orthogonal T (B moves to ``K_T``, solving ``K Σ_x K ∝ V*ᵀTᵀTΣ_εTᵀTV*``); input-dependent noise
``ε = √s(x)·ξ`` (Σ_x replaced by ``E[s(x)xxᵀ]``); full-batch GD on the population loss (charges
conserved, init-dependent); untrained nets. Measure: ``‖G/‖G‖ − G*/‖G*‖‖_F`` between a layer's
Gram on held-out inputs and ``X K Xᵀ`` (:func:`neurothermo.alignment.kernel_distance`); a layer
is "aligned" with a kernel when its median distance is ≤ τ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo.config import setting
from neurothermo.experiments._linear_nets import (
    Chains,
    balanced_kernel,
    hidden,
    init_chains,
    noise_weighted_covariance,
    population_loss,
    product,
    sgd_grads,
    well_conditioned,
    window_scale,
)
from neurothermo.experiments._platonic_linear_report import figure, summarise
from neurothermo.experiments.base import Experiment, RunContext, register

__all__ = ["CONDITIONS", "PlatonicLinearConfig", "hidden", "init_chains", "population_loss",
           "sgd_grads", "well_conditioned"]

# SGD conditions, run side by side as blocks of chains; "GD" and "untrained" are added after.
CONDITIONS = ("reference", "no label noise", "weight decay", "label transform", "input-dependent noise")


@dataclass(frozen=True)
class PlatonicLinearConfig:
    sigma_x: tuple[float, ...] = setting((2.0, 1.0, 0.5), "diagonal of the input covariance Σ_x", min=1e-6)
    sigma_eps: tuple[float, ...] = setting((1.0, 0.5, 0.25), "diagonal of the label-noise covariance Σ_ε",
                                           min=0.0)
    teacher: tuple[float, ...] = setting((1.5, 1.0, 0.7), "singular values of V* (random rotations)",
                                         min=0.0)
    widths_a: tuple[int, ...] = setting((3, 5, 4, 3), "net A: M_in width, hidden widths, M_out width",
                                        min=1)
    widths_b: tuple[int, ...] = setting((3, 6, 6, 6, 3), "net B: M_in width, hidden widths, M_out width",
                                        min=1)
    lr_start: float = setting(0.01, "SGD learning rate at the start", min=1e-6, max=1.0)
    lr_end: float = setting(0.002, "SGD learning rate at the end (geometric annealing)", min=1e-6, max=1.0)
    steps: int = setting(50_000, "online SGD steps", min=10)
    batch_size: int = setting(1, "batch size b", min=1)
    chains: int = setting(4, "independent initialisations per net (and per condition)", min=1, max=256)
    init_scale: float = setting(1.0, "init std × √fan_in", min=1e-6)
    weight_decay: float = setting(0.1, "torch wd of the weight-decay condition (γ = wd/2)", min=0.0)
    transform: tuple[float, ...] = setting(
        (1.0, 0.5, 0.25), "singular values of T (labels Ty for net B; their scale only rescales K_T)",
        min=1e-6)
    noise_width: float = setting(0.3, "input-dependent noise: width w of the window s(z) on z = aᵀx",
                                 min=1e-3)
    noise_direction: tuple[float, ...] = setting((1.0, 0.0, 0.0), "input-dependent noise: direction a")
    gd_lr: float = setting(0.02, "learning rate of the full-batch GD control", min=1e-6, max=1.0)
    gd_steps: int = setting(4000, "steps of the GD control", min=1)
    test_samples: int = setting(500, "held-out inputs for the Gram matrices", min=10)
    threshold: float = setting(0.15, "τ: median kernel distance at or below which layers are aligned",
                               min=0.0, max=1.5)

    def check(self) -> None:
        d = len(self.sigma_x)
        for name in ("sigma_eps", "teacher", "transform", "noise_direction"):
            if len(getattr(self, name)) != d:
                raise ValueError(f"{name} must have the data dimension {d} (the length of sigma_x), "
                                 f"got {getattr(self, name)}")
        if not any(abs(a) > 0 for a in self.noise_direction):
            raise ValueError("noise_direction must be a non-zero vector")
        for name, w in (("widths_a", self.widths_a), ("widths_b", self.widths_b)):
            if len(w) < 3 or w[0] != d or w[-1] != d:
                raise ValueError(f"{name} must start and end with the data dimension {d} and have "
                                 f"at least one hidden layer, got {w}")


@dataclass
class _Net:
    m_in: Tensor   # M_in·Z (the view folded in)
    m_out: Tensor
    init: Chains   # (chains, …) per map


def _distances(Ws: Chains, m_in: Tensor, x: Tensor, kernels: Tensor) -> Tensor:
    """Kernel distance per (chain, hidden layer) to ``kernels[c, k]``; diverged chains give NaN."""
    from neurothermo.alignment import kernel_distance

    hs = hidden(Ws, m_in, x)
    out = torch.full((Ws[0].shape[0], len(hs)), float("nan"), dtype=torch.float64)
    for c in range(out.shape[0]):
        for k, h in enumerate(hs):
            if bool(torch.isfinite(h[c]).all()):
                out[c, k] = kernel_distance(h[c], x, kernels[c, k])
    return out


def _sgd(cfg: PlatonicLinearConfig, ctx: RunContext, name: str, net: _Net, teachers: Tensor,
         noise_l: Tensor, wd: Tensor, windowed: Tensor, a: Tensor, sx: Tensor,
         g: torch.Generator) -> Chains:
    """Online SGD of all condition blocks at once; per-chain teacher, noise factor, wd, window flag."""
    C, d = teachers.shape[0], teachers.shape[-1]
    reps = C // cfg.chains
    Ws = [W.repeat(reps, 1, 1) for W in net.init]
    ratio = cfg.lr_end / cfg.lr_start
    z_scale = float((a @ (sx * a)).sqrt())
    block = max(cfg.steps // 20, 1)
    with ctx.progress(f"SGD, net {name}, {reps} conditions", cfg.steps) as advance:
        for t in range(cfg.steps):
            lr = cfg.lr_start * ratio ** (t / max(cfg.steps - 1, 1))
            x = torch.randn(C, cfg.batch_size, d, generator=g, dtype=torch.float64) * sx.sqrt()
            xi = torch.randn(C, cfg.batch_size, d, generator=g, dtype=torch.float64)
            s = torch.where(windowed[:, None], window_scale(x @ a / z_scale, cfg.noise_width), 1.0)
            y = x @ teachers.transpose(1, 2) + s.sqrt().unsqueeze(-1) * (xi @ noise_l.transpose(1, 2))
            grads = sgd_grads(Ws, net.m_in, net.m_out, x, y)
            Ws = [W - lr * (gW + wd[:, None, None] * W) for W, gW in zip(Ws, grads)]
            if (t + 1) % block == 0:
                ctx.log(t + 1, net=name, lr=lr, weight_norm=float(sum(W.square().sum() for W in Ws)))
                advance(block)
    return Ws


def run(cfg: PlatonicLinearConfig, ctx: RunContext) -> None:
    from neurothermo.alignment import gram_alignment, kernel_distance, platonic_kernel

    g = torch.Generator().manual_seed(ctx.seed)
    dt = torch.float64
    d = len(cfg.sigma_x)
    sx = torch.tensor(cfg.sigma_x, dtype=dt)
    Sx, Se = torch.diag(sx), torch.diag(torch.tensor(cfg.sigma_eps, dtype=dt))
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    V = q1 @ torch.diag(torch.tensor(cfg.teacher, dtype=dt)) @ q2
    K = platonic_kernel(Sx, V, Se)  # refuses Σ_ε without full rank: the reference needs noise
    q3, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    T = q3 @ torch.diag(torch.tensor(cfg.transform, dtype=dt))  # non-orthogonal unless all equal
    K_T = platonic_kernel(Sx, T @ V, T @ Se @ T.T)
    a = torch.tensor(cfg.noise_direction, dtype=dt)
    a = a / a.norm()
    K_s = platonic_kernel(noise_weighted_covariance(Sx, a, cfg.noise_width), V, Se)
    x_test = torch.randn(cfg.test_samples, d, generator=g, dtype=dt) * sx.sqrt()

    nets: dict[str, _Net] = {}
    for name, widths in (("A", cfg.widths_a), ("B", cfg.widths_b)):
        z = torch.eye(d, dtype=dt) if name == "A" else well_conditioned(d, g)
        # the view Z is folded into m_in, so every net is fed the same raw inputs x
        nets[name] = _Net(m_in=well_conditioned(d, g) @ z, m_out=well_conditioned(d, g),
                          init=init_chains(widths, cfg.chains, cfg.init_scale, g))

    n, ch = len(CONDITIONS), cfg.chains
    blk = {c: slice(i * ch, (i + 1) * ch) for i, c in enumerate(CONDITIONS)}
    se_half = Se.sqrt()
    dist: dict[str, dict[str, Tensor]] = {}   # condition → net → distance to K* (chains, layers)
    dpred: dict[str, dict[str, Tensor]] = {}  # condition → net → distance to its predicted kernel
    final: dict[str, dict[str, Chains]] = {}  # net → {"sgd", "gd"} weights
    for name, net in nets.items():
        teachers = V.expand(n * ch, d, d).clone()
        noise_l = se_half.expand(n * ch, d, d).clone()
        noise_l[blk["no label noise"]] = 0.0
        if name == "B":
            teachers[blk["label transform"]] = T @ V
            noise_l[blk["label transform"]] = T @ se_half
        wd = torch.zeros(n * ch, dtype=dt)
        wd[blk["weight decay"]] = cfg.weight_decay
        windowed = torch.zeros(n * ch, dtype=torch.bool)
        windowed[blk["input-dependent noise"]] = True
        Ws = _sgd(cfg, ctx, name, net, teachers, noise_l, wd, windowed, a, sx, g)
        L = len(Ws) - 1
        kstar = K.expand(n * ch, L, d, d)
        kpred = kstar.clone()
        P = product([W[blk["weight decay"]] for W in Ws])
        P = torch.where(torch.isfinite(P), P, 0.0)  # a diverged chain's distances are NaN anyway
        for k in range(L):
            kpred[blk["weight decay"], k] = balanced_kernel(net.m_in, P, k + 1, len(Ws))
            kpred[blk["input-dependent noise"], k] = K_s
            if name == "B":
                kpred[blk["label transform"], k] = K_T
        d_star = _distances(Ws, net.m_in, x_test, kstar)
        d_pred = _distances(Ws, net.m_in, x_test, kpred)
        for c in CONDITIONS:
            dist.setdefault(c, {})[name] = d_star[blk[c]]
            dpred.setdefault(c, {})[name] = d_pred[blk[c]]
        # controls: untrained nets, and full-batch GD on the population loss from the same inits
        k_ch = K.expand(ch, L, d, d)
        dist.setdefault("untrained", {})[name] = _distances(net.init, net.m_in, x_test, k_ch)
        Wg = [W.clone().requires_grad_(True) for W in net.init]
        for _ in range(cfg.gd_steps):
            gd_grads = torch.autograd.grad(population_loss(Wg, net.m_in, net.m_out, V, Sx), Wg)
            with torch.no_grad():
                for W, gW in zip(Wg, gd_grads):
                    W -= cfg.gd_lr * gW
        Wg = [W.detach() for W in Wg]
        dist.setdefault("GD", {})[name] = _distances(Wg, net.m_in, x_test, k_ch)
        final[name] = {"sgd": [W[blk["reference"]] for W in Ws], "gd": Wg,
                       "transform": [W[blk["label transform"]] for W in Ws]}

    tau = cfg.threshold
    # Separation s of each predicted kernel from K*: a layer within τ of a kernel s away from K* is
    # ≥ s − τ from K* (triangle inequality), so if the median layer has s ≥ 2τ, "median distance to
    # K* ≥ τ" follows from "aligned with the predicted kernel": τ ≤ s/2 makes the verdict decidable.
    # (The balanced kernels are taken at each net's zero-wd product M_out⁻¹V*M_in⁻¹, per layer.)
    sep = {c: kernel_distance(x_test @ _psd_sqrt(k), x_test, K)
           for c, k in (("label transform", K_T), ("input-dependent noise", K_s))}
    sep_wd = [kernel_distance(x_test @ _psd_sqrt(balanced_kernel(
        net.m_in, torch.linalg.solve(net.m_out, V) @ torch.linalg.inv(net.m_in), k, len(net.init))),
        x_test, K) for net in nets.values() for k in range(1, len(net.init))]
    sep["weight decay"] = float(torch.tensor(sep_wd).median())
    s_min = min(sep.values())
    ctx.predict("threshold τ at most half the smallest (median-layer) separation of a broken kernel "
                "from K*", tau, s_min / 2, 0.0, sense="at_most",
                why="a layer within τ of a kernel s from K* is ≥ s − τ ≥ τ from K* only if τ ≤ s/2")

    table = summarise(ctx, dist, dpred, tau)

    maps: dict[str, Tensor] = {}
    for kind in ("sgd", "gd", "transform"):
        ha = hidden(final["A"][kind], nets["A"].m_in, x_test)
        hb = hidden(final["B"][kind], nets["B"].m_in, x_test)  # m_in includes the view
        maps[kind] = torch.tensor([[gram_alignment(x[0], y[0])
                                    if bool(torch.isfinite(x[0]).all() & torch.isfinite(y[0]).all())
                                    else float("nan") for y in hb] for x in ha])
    # On the unit sphere of Gram matrices, two layers within τ of K* are ≤ 2τ apart, so their
    # cosine is ≥ 1 − (2τ)²/2.
    cos_min = 1 - (2 * tau) ** 2 / 2
    ctx.predict("reference: min cross-network Gram cosine over hidden-layer pairs",
                float(maps["sgd"].min()), cos_min, 0.0, sense="at_least",
                why="both within τ of K* ⇒ cosine ≥ 1 − (2τ)²/2")
    ctx.record(
        conditions=table, separation_from_kstar=sep,
        kernel_distance={c: {n: v.tolist() for n, v in per.items()} for c, per in dist.items()},
        kernel_distance_predicted={c: {n: v.tolist() for n, v in per.items()} for c, per in dpred.items()},
        cross_alignment={k: v.tolist() for k, v in maps.items()},
        platonic_kernel=K.tolist(), transform_kernel=K_T.tolist(), noise_weighted_kernel=K_s.tolist(),
    )
    figure(ctx, table, dist, dpred, maps, tau, cos_min)


def _psd_sqrt(k: Tensor) -> Tensor:
    w, u = torch.linalg.eigh((k + k.T) / 2)
    result: Tensor = (u * w.clamp_min(0.0).sqrt()) @ u.T
    return result


EXPERIMENT = register(
    Experiment(
        name="platonic-linear",
        title="Embedded deep linear nets on two views converge to the predicted kernel K*; "
              "five ways to break it",
        config=PlatonicLinearConfig,
        quick=PlatonicLinearConfig(lr_start=0.01, lr_end=0.003, steps=30_000, chains=3,
                                   gd_steps=2000),
        full=PlatonicLinearConfig(),
        run=run,
        cost="full: 2 nets × 5 conditions × 4 chains × 50k online SGD steps, ~25 s on one core",
    )
)
