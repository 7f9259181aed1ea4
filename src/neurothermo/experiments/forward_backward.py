"""``forward-backward``: at the entropic equilibrium the covariance of the hidden activations is
aligned with that of the backward gradients (docs/theory.md §2–§3).

Embedded deep linear net ``f(x) = M_out W_D ⋯ W_1 M_in x``, hidden layers ``h_k = T_k x`` with
``T_k = W_k ⋯ W_1 M_in`` (``h_0 = M_in x``), per-sample loss ``½‖f − y‖²``, ``y = V*x + ε``,
``x ~ N(0, Σ_x)``, ``ε ~ N(0, Σ_ε)`` independent of x. The backward gradient at layer k is
``δ_k = ∂l/∂h_k = S_kᵀ r`` with ``S_k = M_out W_D ⋯ W_{k+1}`` and the residual ``r = f − y``; the
per-sample gradients are ``g_k = δ_k h_{k−1}ᵀ``. The GL(d_k) symmetry between ``W_k`` and
``W_{k+1}`` has the balance condition (stationarity of its charge ``W_kW_kᵀ − W_{k+1}ᵀW_{k+1}``
under SGD without weight decay, η → 0)

    E[g_k g_kᵀ] = E[g_{k+1}ᵀ g_{k+1}]   ⇔   E[‖h_{k−1}‖² δ_k δ_kᵀ] = E[‖δ_{k+1}‖² h_k h_kᵀ].

(With a batch of b the cross terms of different samples vanish at a minimum, where ``r = −ε`` has
mean zero given x, so both sides carry the same 1/b.) At a global minimum ``r = −ε`` is independent
of x, the expectations factorise, and the balance becomes the alignment relation checked here:

    E‖h_{k−1}‖² · C_δ,k = E‖δ_{k+1}‖² · C_h,k,     C_δ,k = E[δ_kδ_kᵀ] = S_kᵀΣ_εS_k,
                                                  C_h,k = E[h_kh_kᵀ] = T_kΣ_xT_kᵀ,

i.e. at every hidden layer the activation covariance is proportional to the backward-gradient
covariance, with the stated constant. All sides are computed as exact Gaussian expectations for
the current weights (``E[xᵀQx·xxᵀ] = tr(QΣ)Σ + 2ΣQΣ``), so no sampling error enters them.

What is checked, and its tolerance. One SGD step (b = 1, no weight decay) moves the charge by exactly
``η²(g_kg_kᵀ − g_{k+1}ᵀg_{k+1})`` (the first-order terms cancel by the symmetry), whose mean given
the weights is ``η²(A_k − B_k)``. In a stationary state at constant η the mean charge does not move,
so the stationary mean of ``A_k − B_k`` is exactly 0 at any η, with no O(η) correction. The run
anneals η from ``lr_start`` to ``lr_end`` over ``steps`` (burn-in), then holds ``lr_end`` for a
``window`` in which ``A_k − B_k`` is averaged (recorded every ``every`` steps, ``blocks`` time
blocks). Prediction 1: ``ρ̄_k = ‖⟨A_k − B_k⟩‖_F/‖⟨B_k⟩‖_F ≤ ε_k``, ε_k the norm of the block standard
errors at its one-sided quantile (Bonferroni over chains × layers; the norm of k_eff normal
entries concentrates with relative spread 1/√(2k_eff), the pooled block variance with
1/√(2k_eff(blocks − 1))). The factorised relation differs from the balance by the terms of the
end-to-end error E, ``a_k − b_k = 2S_kᵀEΣ_xQΣ_xEᵀS_k − 2T_kΣ_xEᵀRE Σ_xT_kᵀ`` (``Q = T_{k−1}ᵀT_{k−1}``,
``R = S_{k+1}S_{k+1}ᵀ``), which is O(η) (E fluctuates by O(√η) around 0) and computed exactly from
the weights: prediction 2 is ``‖⟨X_k − Y_k⟩‖ ≤ ε_k‖⟨B_k⟩‖ + ‖⟨a_k − b_k⟩‖`` (over ``‖⟨Y_k⟩‖``),
``X_k = E‖h_{k−1}‖²C_δ,k``, ``Y_k = E‖δ_{k+1}‖²C_h,k``, and prediction 3 its consequence
``cos(⟨X_k⟩, ⟨Y_k⟩) ≥ √(1 − ε_align²)``. Control: full-batch GD on the population loss from the same
start conserves the charges (to its exact ``η²`` step terms), stays unbalanced and fails all three.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from neurothermo.config import setting
from neurothermo.experiments._common import pyplot
from neurothermo.experiments.base import Experiment, RunContext, register
from neurothermo.experiments.platonic_linear import init_chains, sgd_grads, well_conditioned

Chains = list[Tensor]


@dataclass(frozen=True)
class ForwardBackwardConfig:
    sigma_x: tuple[float, ...] = setting((2.0, 1.0, 0.5), "diagonal of Σ_x", min=1e-6)
    sigma_eps: tuple[float, ...] = setting((1.0, 0.5, 0.25), "diagonal of Σ_ε", min=0.0)
    teacher: tuple[float, ...] = setting((1.5, 1.0, 0.7), "singular values of V*", min=0.0)
    widths: tuple[int, ...] = setting((3, 4, 4, 3), "M_in width, hidden widths, M_out width", min=1)
    optimizer: Literal["sgd", "gd"] = setting("sgd", "the main run: online SGD (theory) or full-batch "
                                              "GD (the control that must fail)", choices=("sgd", "gd"))
    lr_start: float = setting(0.02, "learning rate at the start", min=1e-6, max=1.0)
    lr_end: float = setting(0.02, "learning rate at the end of the annealing and in the window",
                            min=1e-6, max=1.0)
    steps: int = setting(30_000, "burn-in steps (η annealed geometrically from lr_start to lr_end)",
                         min=10)
    chains: int = setting(4, "independent initialisations", min=2, max=256)
    init_scale: float = setting(1.0, "init std × √fan_in", min=1e-6)
    records: int = setting(20, "measurements along training (for the figure)", min=2, max=1000)
    window: int = setting(20_000, "steps at lr_end after the burn-in over which A_k − B_k is averaged",
                          min=10)
    every: int = setting(20, "steps between two measurements in the window", min=1)
    blocks: int = setting(10, "time blocks of the window for the standard errors", min=3, max=1000)
    alpha: float = setting(1e-3, "family-wise false-alarm level of the statistical allowance",
                           min=1e-9, max=0.5)

    def check(self) -> None:
        d = len(self.sigma_x)
        if len(self.sigma_eps) != d or len(self.teacher) != d:
            raise ValueError("sigma_x, sigma_eps and teacher must have the data dimension")
        if len(self.widths) < 3 or self.widths[0] != d or self.widths[-1] != d:
            raise ValueError(f"widths must start and end with {d} and have a hidden layer")
        if self.window // self.every < self.blocks:
            raise ValueError(f"the window of {self.window} steps measured every {self.every} gives "
                             f"fewer than blocks = {self.blocks} measurements; lengthen the window")


def _bmm_chain(mats: list[Tensor]) -> Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = out @ m
    return out


Sides = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def balance_sides(Ws: Chains, m_in: Tensor, m_out: Tensor, V: Tensor, sx: Tensor,
                  se: Tensor) -> list[Sides]:
    """For each hidden layer k: ``(A_k, B_k, C_h,k, C_δ,k, X_k, Y_k)`` as exact expectations, per chain.

    ``A_k = E[‖h_{k−1}‖² δ_kδ_kᵀ]``, ``B_k = E[‖δ_{k+1}‖² h_kh_kᵀ]`` (per-sample, b = 1),
    ``C_h,k = T_kΣ_xT_kᵀ``, ``C_δ,k = S_kᵀ(EΣ_xEᵀ + Σ_ε)S_k`` with ``E = P − V*`` the error of the
    end-to-end map, and the factorised sides ``X_k = E‖h_{k−1}‖²·C_δ,k``, ``Y_k = E‖δ_{k+1}‖²·C_h,k``
    (``A_k − X_k`` and ``B_k − Y_k`` are the O(‖E‖²) terms). Shapes ``(C, d_k, d_k)``.
    """
    C = Ws[0].shape[0]
    D = len(Ws)
    T = [m_in.expand(C, -1, -1)]
    for W in Ws:
        T.append(W @ T[-1])                     # T[k] = W_k ⋯ W_1 M_in
    S = [m_out.expand(C, -1, -1)] * (D + 1)
    for k in range(D - 1, -1, -1):
        S[k] = S[k + 1] @ Ws[k]                 # S[k] = M_out W_D ⋯ W_{k+1}
    E = m_out @ T[D] - V
    Et = E.transpose(1, 2)
    Sx, Se = torch.diag(sx), torch.diag(se)
    out = []
    for k in range(1, D):
        Q = T[k - 1].transpose(1, 2) @ T[k - 1]
        trQ = (Q @ Sx).diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
        mid = trQ * (E @ Sx @ Et + Se) + 2 * E @ Sx @ Q @ Sx @ Et
        A = S[k].transpose(1, 2) @ mid @ S[k]
        R = S[k + 1] @ S[k + 1].transpose(1, 2)
        ERE = Et @ R @ E
        c = ((ERE @ Sx).diagonal(dim1=1, dim2=2).sum(-1)
             + (R @ Se).diagonal(dim1=1, dim2=2).sum(-1))[:, None, None]
        B = T[k] @ (c * Sx + 2 * Sx @ ERE @ Sx) @ T[k].transpose(1, 2)
        Ch = T[k] @ Sx @ T[k].transpose(1, 2)
        Cd = S[k].transpose(1, 2) @ (E @ Sx @ Et + Se) @ S[k]
        out.append((A, B, Ch, Cd, trQ * Cd, c * Ch))
    return out


def population_grads(Ws: Chains, m_in: Tensor, m_out: Tensor, V: Tensor, sx: Tensor) -> Chains:
    """Gradients of the population loss ``½tr(EΣ_xEᵀ)`` per chain (``E = M_out W_D⋯W_1 M_in − V*``,
    ``Σ_x = diag(sx)``): ``∇_{W_k} = S_kᵀ E Σ_x T_{k−1}ᵀ`` in closed form (tested against autograd of
    :func:`population_loss`)."""
    C, D = Ws[0].shape[0], len(Ws)
    T = [m_in.expand(C, -1, -1)]
    for W in Ws:
        T.append(W @ T[-1])
    S = [m_out.expand(C, -1, -1)] * (D + 1)
    for k in range(D - 1, -1, -1):
        S[k] = S[k + 1] @ Ws[k]
    G = (m_out @ T[D] - V) * sx
    return [S[k + 1].transpose(1, 2) @ G @ T[k].transpose(1, 2) for k in range(D)]


def _fro(a: Tensor) -> Tensor:
    result: Tensor = a.flatten(1).norm(dim=1)
    return result


def measures(sides: list[Sides]) -> tuple[np.ndarray, np.ndarray]:
    """Relative imbalance ρ (chains × layers) and the cosine of C_h and C_δ (chains × layers)."""
    rho = torch.stack([_fro(s[0] - s[1]) / _fro(s[1]) for s in sides], dim=1)
    cos = torch.stack([_cos(s[2], s[3]) for s in sides], dim=1)
    return rho.numpy(), cos.numpy()


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1) / (_fro(a) * _fro(b))


def norm_allowance(se: Tensor, blocks: int, comparisons: int, alpha: float) -> Tensor:
    """Upper ``1 − alpha/comparisons`` bound on ``‖mean − truth‖_F`` from elementwise block standard
    errors ``se`` (``(C, d, d)``, symmetric): ``√(Σse²)·(1 + z/√(2k))/(1 − z/√(2k(blocks − 1)))``,
    ``k = (Σse²)²/Σ(w·se²)²`` the effective number of independent entries (w = 2 off the diagonal,
    whose two copies are one entry), ``z`` the normal quantile. The numerator is the spread of the
    norm of k normal entries, the denominator that of the pooled block variance.
    """
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha / comparisons)
    s2 = se.flatten(1) ** 2
    upper = torch.triu(torch.ones(se.shape[1:], dtype=se.dtype))
    w = (2 * upper - torch.eye(se.shape[1], dtype=se.dtype)).flatten()
    tot = s2.sum(1)
    k = torch.where(tot > 0, tot**2 / ((w * s2) ** 2).sum(1).clamp_min(1e-300), torch.ones_like(tot))
    den = (1 - z / (2 * k * (blocks - 1)).sqrt()).clamp_min(1e-3)
    return tot.sqrt() * (1 + z / (2 * k).sqrt()) / den


@dataclass(frozen=True)
class WindowStats:
    """Time averages over the window (per layer, ``(C, d_k, d_k)``) and the block standard errors of
    ``A_k − B_k``: ``imbalance = ⟨A − B⟩``, ``B = ⟨B⟩``, ``X``/``Y`` the factorised sides, ``se``."""

    imbalance: list[Tensor]
    B: list[Tensor]
    X: list[Tensor]
    Y: list[Tensor]
    se: list[Tensor]


def train(cfg: ForwardBackwardConfig, kind: str, Ws: Chains, m_in: Tensor, m_out: Tensor, V: Tensor,
          sx: Tensor, se: Tensor, g: torch.Generator, ctx: RunContext
          ) -> tuple[Chains, list[tuple[int, np.ndarray, np.ndarray]], float, Tensor, WindowStats]:
    """SGD (online, b = 1) or GD (population loss): ``steps`` annealed, then ``window`` at ``lr_end``.

    Returns the weights, the records along training, for GD the exact bound
    ``Σ η²‖g_kg_kᵀ − g_{k+1}ᵀg_{k+1}‖`` on the charge drift (0 for SGD), the start's charges and the
    window's time averages with block standard errors."""
    d = len(sx)
    ratio = cfg.lr_end / cfg.lr_start
    total = cfg.steps + cfg.window
    every = max(total // cfg.records, 1)
    recs = [(0, *measures(balance_sides(Ws, m_in, m_out, V, sx, se)))]
    J0 = torch.stack([Ws[k] @ Ws[k].transpose(1, 2) - Ws[k + 1].transpose(1, 2) @ Ws[k + 1]
                      for k in range(len(Ws) - 1)])
    bound = torch.zeros(())
    n_meas = cfg.window // cfg.every
    per_block = n_meas // cfg.blocks
    sums: list[list[Tensor]] | None = None       # per quantity, per layer: running sums
    block_means: list[list[Tensor]] = []         # per block: ⟨A − B⟩ per layer
    cur: list[Tensor] | None = None
    n_cur = n_done = 0
    for t in ctx.track(range(total), f"{kind} steps"):
        lr = cfg.lr_start * ratio ** min(t / max(cfg.steps - 1, 1), 1.0)
        if kind == "sgd":
            x = torch.randn(Ws[0].shape[0], 1, d, generator=g, dtype=sx.dtype) * sx.sqrt()
            y = x @ V.T + torch.randn(Ws[0].shape[0], 1, d, generator=g, dtype=sx.dtype) * se.sqrt()
            grads = sgd_grads(Ws, m_in, m_out, x, y)
        else:
            grads = population_grads(Ws, m_in, m_out, V, sx)
            bound = bound + lr**2 * torch.stack([
                _fro(grads[k] @ grads[k].transpose(1, 2) - grads[k + 1].transpose(1, 2) @ grads[k + 1])
                for k in range(len(Ws) - 1)]).sum(0).max()
        Ws = [(W - lr * gW).detach() for W, gW in zip(Ws, grads)]
        w_step = t + 1 - cfg.steps
        if w_step > 0 and w_step % cfg.every == 0 and n_done < per_block * cfg.blocks:
            sides = balance_sides(Ws, m_in, m_out, V, sx, se)
            vals = [[s[0] - s[1] for s in sides], [s[1] for s in sides], [s[4] for s in sides],
                    [s[5] for s in sides]]
            sums = vals if sums is None else [[a + v for a, v in zip(sa, va)]
                                              for sa, va in zip(sums, vals)]
            cur = vals[0] if cur is None else [a + v for a, v in zip(cur, vals[0])]
            n_cur += 1
            n_done += 1
            if n_cur == per_block:
                block_means.append([c / per_block for c in cur])
                cur, n_cur = None, 0
        if (t + 1) % every == 0:
            rho, cos = measures(balance_sides(Ws, m_in, m_out, V, sx, se))
            recs.append((t + 1, rho, cos))
            ctx.log(t + 1, optimizer=kind, lr=lr, imbalance_mean=float(rho.mean()),
                    cosine_mean=float(cos.mean()))
    if not all(bool(torch.isfinite(W).all()) for W in Ws):
        raise FloatingPointError(f"{kind} diverged; lower lr_start")
    assert sums is not None
    nb = len(block_means)
    ses = [torch.stack([bm[k] for bm in block_means]).std(0) / nb**0.5 for k in range(len(sums[0]))]
    imb, b_avg, x_avg, y_avg = ([v / n_done for v in q] for q in sums)
    stats = WindowStats(imbalance=imb, B=b_avg, X=x_avg, Y=y_avg, se=ses)
    return Ws, recs, float(bound), J0, stats


def run(cfg: ForwardBackwardConfig, ctx: RunContext) -> None:
    g = torch.Generator().manual_seed(ctx.seed)
    dt = torch.float64
    d = len(cfg.sigma_x)
    sx, se = torch.tensor(cfg.sigma_x, dtype=dt), torch.tensor(cfg.sigma_eps, dtype=dt)
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    V = q1 @ torch.diag(torch.tensor(cfg.teacher, dtype=dt)) @ q2
    m_in, m_out = well_conditioned(d, g), well_conditioned(d, g)
    W0 = init_chains(cfg.widths, cfg.chains, cfg.init_scale, g)
    runs = {}
    for kind in dict.fromkeys((cfg.optimizer, "gd")):
        runs[kind] = train(cfg, kind, [W.clone() for W in W0], m_in, m_out, V, sx, se, g, ctx)
    st = runs[cfg.optimizer][4]
    n_layers = len(st.B)
    m = cfg.chains * n_layers
    eps = torch.stack([norm_allowance(st.se[k], cfg.blocks, m, cfg.alpha) / _fro(st.B[k])
                       for k in range(n_layers)], 1)                         # (chains, layers)
    rho_bar = torch.stack([_fro(st.imbalance[k]) / _fro(st.B[k]) for k in range(n_layers)], 1)
    corr = torch.stack([_fro(st.imbalance[k] - (st.X[k] - st.Y[k])) / _fro(st.Y[k])
                        for k in range(n_layers)], 1)                        # ‖⟨a − b⟩‖/‖⟨Y⟩‖
    eps_al = torch.stack([eps[:, k] * _fro(st.B[k]) / _fro(st.Y[k]) for k in range(n_layers)], 1) + corr
    rho_al = torch.stack([_fro(st.X[k] - st.Y[k]) / _fro(st.Y[k]) for k in range(n_layers)], 1)
    cos_al = torch.stack([_cos(st.X[k], st.Y[k]) for k in range(n_layers)], 1)
    floor = 1e-12  # GD: deterministic, zero block errors; keeps the ratio finite
    label = cfg.optimizer.upper()
    stat_why = (f"‖⟨A_k − B_k⟩‖ over {cfg.window} steps at η = {cfg.lr_end:g}, standard errors from "
                f"{cfg.blocks} time blocks, allowance ε_k their norm at its 1 − {cfg.alpha:g}/{m} "
                "quantile (Bonferroni over chains × layers)")
    ctx.predict(f"{label}: balance ⟨A_k⟩ = ⟨B_k⟩ (A_k = E‖h_(k−1)‖²δ_kδ_kᵀ, B_k = E‖δ_(k+1)‖²h_kh_kᵀ) "
                "at every hidden layer: max over chains and layers of ρ̄_k/ε_k",
                float((rho_bar / eps.clamp_min(floor)).max()), 1.0, 0.0, sense="at_most",
                why="the charge moves by η²(A_k − B_k) in the mean per step, so its stationary mean "
                    "is exactly 0 at any constant η (no O(η) correction); " + stat_why)
    ctx.predict(f"{label}: alignment E‖h_(k−1)‖²C_δ,k = E‖δ_(k+1)‖²C_h,k, time-averaged: max over "
                "chains and layers of its relative residual over ε_k + ‖⟨a_k − b_k⟩‖",
                float((rho_al / eps_al.clamp_min(floor)).max()), 1.0, 0.0, sense="at_most",
                why="X_k − Y_k = (A_k − B_k) − (a_k − b_k): the balance's allowance plus the O(η) "
                    "terms of the end-to-end error E (quadratic in E, computed from the weights); "
                    + stat_why)
    ctx.predict(f"{label}: cosine of ⟨E‖h_(k−1)‖²C_δ,k⟩ and ⟨E‖δ_(k+1)‖²C_h,k⟩ minus its bound "
                "√(1 − ε_align²) (min over chains and layers)",
                float((cos_al - (1 - eps_al.clamp(max=1.0) ** 2).sqrt()).min()), 0.0, 0.0,
                sense="at_least", why="‖X − Y‖ ≤ ε_align‖Y‖ implies cos(X, Y) ≥ √(1 − ε_align²)")
    window = {"rho_bar": rho_bar.tolist(), "eps": eps.tolist(), "rho_align": rho_al.tolist(),
              "eps_align": eps_al.tolist(), "correction_eta": corr.tolist(),
              "cos_align": cos_al.tolist()}
    Wg, _, bound, J0, _ = runs["gd"]
    Jg = torch.stack([Wg[k] @ Wg[k].transpose(1, 2) - Wg[k + 1].transpose(1, 2) @ Wg[k + 1]
                      for k in range(len(Wg) - 1)])
    drift = float((Jg - J0).flatten(2).norm(dim=2).sum(0).max())
    ctx.predict("control: GD keeps its charges W_kW_kᵀ − W_(k+1)ᵀW_(k+1) (max drift)", drift, 0.0,
                bound + 1e-10, sense="at_most", control=True,
                why="exact step identity: the charge moves by η²(g_kg_kᵀ − g_(k+1)ᵀg_(k+1)) per step; "
                    "their summed norms bound the drift")
    ctx.record(imbalance_final={k: r[1][-1][1].tolist() for k, r in runs.items()},
               cosine_final={k: r[1][-1][2].tolist() for k, r in runs.items()},
               window=window, gd_charge_drift=drift, gd_charge_bound=bound)
    _figure(cfg, ctx, {k: v[1] for k, v in runs.items()}, rho_bar.numpy(), eps.numpy())


def _figure(cfg: ForwardBackwardConfig, ctx: RunContext,
            recs: dict[str, list[tuple[int, np.ndarray, np.ndarray]]], rho_bar: np.ndarray,
            eps: np.ndarray) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    n_layers = len(cfg.widths) - 2
    colors = plt.cm.tab10(np.arange(n_layers))
    for kind, ls in (("sgd", "-"), ("gd", "--")):
        if kind not in recs:
            continue
        steps = np.array([r[0] for r in recs[kind]])
        rho = np.stack([r[1].mean(0) for r in recs[kind]])
        cos = np.stack([r[2].mean(0) for r in recs[kind]])
        for k in range(n_layers):
            a1.semilogy(np.maximum(steps, 1), rho[:, k], ls, color=colors[k],
                        label=f"{kind.upper()}, layer {k + 1}")
            a2.plot(np.maximum(steps, 1), cos[:, k], ls, color=colors[k],
                    label=f"{kind.upper()}, layer {k + 1}")
    a1.axvspan(cfg.steps, cfg.steps + cfg.window, color="gray", alpha=0.12, label="window (η = lr_end)")
    mid = cfg.steps + cfg.window / 2
    for k in range(n_layers):  # time-averaged ρ̄ per chain (dots) and its allowance ε (bars)
        xs = np.full(len(rho_bar), mid * (1 + 0.15 * k))
        a1.plot(xs, rho_bar[:, k], "o", ms=4, color=colors[k],
                label=f"{cfg.optimizer.upper()} window mean ρ̄, layer {k + 1}")
        a1.plot(xs, eps[:, k], "_", ms=12, mew=2, color=colors[k],
                label=f"its allowance ε, layer {k + 1}")
    a1.set_xscale("log")
    a1.set_xlabel("step")
    a1.set_ylabel("ρ_k = ‖E‖h_(k−1)‖²δδᵀ − E‖δ_(k+1)‖²hhᵀ‖ / ‖·‖")
    a1.set_title("balance of forward and backward covariances")
    a1.legend(fontsize=7)
    a2.axhline(1.0, color="black", ls=":")
    a2.set_xscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("cos(C_h,k, C_δ,k)")
    a2.set_title("hidden-activation vs backward-gradient covariance")
    a2.legend(fontsize=7)
    ctx.savefig(fig, "forward_backward")


EXPERIMENT = register(
    Experiment(
        name="forward-backward",
        title="At the entropic equilibrium of an embedded deep linear net the hidden-activation "
              "covariance is proportional to the backward-gradient covariance (§2–§3)",
        config=ForwardBackwardConfig,
        quick=ForwardBackwardConfig(),
        full=ForwardBackwardConfig(steps=60_000, window=100_000),
        run=run,
        cost="full: 4 chains × (60k + 100k) online SGD steps + the GD control, ~38 s on one core",
    )
)

