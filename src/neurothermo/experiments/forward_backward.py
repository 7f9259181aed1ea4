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
covariance, with the stated constant. Both sides are computed as exact Gaussian expectations for
the current weights (``E[xᵀQx·xxᵀ] = tr(QΣ)Σ + 2ΣQΣ``), so no sampling error enters. The checked
quantity is the relative imbalance ``ρ_k = ‖A_k − B_k‖_F/‖B_k‖_F`` with ``A_k``, ``B_k`` the two
sides of the balance (exact for any weights), together with the cosine of ``C_h,k`` and ``C_δ,k``.
Online SGD (annealed η) against a control: full-batch GD on the population loss from the same
start conserves the charges (to its exact ``η²`` step terms) and stays unbalanced.
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
from neurothermo.experiments.platonic_linear import (
    init_chains,
    population_loss,
    sgd_grads,
    well_conditioned,
)

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
    lr_end: float = setting(0.002, "learning rate at the end (geometric annealing)", min=1e-6, max=1.0)
    steps: int = setting(60_000, "steps", min=10)
    chains: int = setting(4, "independent initialisations", min=2, max=256)
    init_scale: float = setting(1.0, "init std × √fan_in", min=1e-6)
    records: int = setting(20, "measurements along training", min=2, max=1000)
    tolerance: float = setting(0.15, "largest relative imbalance ρ_k accepted at the end of SGD",
                               min=0.0, max=10.0)

    def check(self) -> None:
        d = len(self.sigma_x)
        if len(self.sigma_eps) != d or len(self.teacher) != d:
            raise ValueError("sigma_x, sigma_eps and teacher must have the data dimension")
        if len(self.widths) < 3 or self.widths[0] != d or self.widths[-1] != d:
            raise ValueError(f"widths must start and end with {d} and have a hidden layer")


def _bmm_chain(mats: list[Tensor]) -> Tensor:
    out = mats[0]
    for m in mats[1:]:
        out = out @ m
    return out


def balance_sides(Ws: Chains, m_in: Tensor, m_out: Tensor, V: Tensor, sx: Tensor,
                  se: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """For each hidden layer k: ``(A_k, B_k, C_h,k, C_δ,k)`` as exact expectations, per chain.

    ``A_k = E[‖h_{k−1}‖² δ_kδ_kᵀ]``, ``B_k = E[‖δ_{k+1}‖² h_kh_kᵀ]`` (per-sample, b = 1),
    ``C_h,k = T_kΣ_xT_kᵀ``, ``C_δ,k = S_kᵀ(EΣ_xEᵀ + Σ_ε)S_k`` with ``E = P − V*`` the error of the
    end-to-end map. Shapes ``(C, d_k, d_k)``.
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
        out.append((A, B, Ch, Cd))
    return out


def _fro(a: Tensor) -> Tensor:
    result: Tensor = a.flatten(1).norm(dim=1)
    return result


def measures(sides: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """Relative imbalance ρ (chains × layers) and the cosine of C_h and C_δ (chains × layers)."""
    rho = torch.stack([_fro(A - B) / _fro(B) for A, B, _, _ in sides], dim=1)
    cos = torch.stack([(Ch * Cd).flatten(1).sum(1) / (_fro(Ch) * _fro(Cd)) for _, _, Ch, Cd in sides],
                      dim=1)
    return rho.numpy(), cos.numpy()


def train(cfg: ForwardBackwardConfig, kind: str, Ws: Chains, m_in: Tensor, m_out: Tensor, V: Tensor,
          sx: Tensor, se: Tensor, g: torch.Generator, ctx: RunContext
          ) -> tuple[Chains, list[tuple[int, np.ndarray, np.ndarray]], float, Tensor]:
    """SGD (online, b = 1) or GD (population loss); returns the weights, the records, and for GD
    the exact bound ``Σ η²‖g_kg_kᵀ − g_{k+1}ᵀg_{k+1}‖`` on the charge drift (0 for SGD) and the
    start's charges."""
    d = len(sx)
    ratio = cfg.lr_end / cfg.lr_start
    every = max(cfg.steps // cfg.records, 1)
    recs = [(0, *measures(balance_sides(Ws, m_in, m_out, V, sx, se)))]
    J0 = torch.stack([Ws[k] @ Ws[k].transpose(1, 2) - Ws[k + 1].transpose(1, 2) @ Ws[k + 1]
                      for k in range(len(Ws) - 1)])
    bound = torch.zeros(())
    for t in ctx.track(range(cfg.steps), f"{kind} steps"):
        lr = cfg.lr_start * ratio ** (t / max(cfg.steps - 1, 1))
        if kind == "sgd":
            x = torch.randn(Ws[0].shape[0], 1, d, generator=g, dtype=sx.dtype) * sx.sqrt()
            y = x @ V.T + torch.randn(Ws[0].shape[0], 1, d, generator=g, dtype=sx.dtype) * se.sqrt()
            grads = sgd_grads(Ws, m_in, m_out, x, y)
        else:
            leaves = [W.detach().requires_grad_(True) for W in Ws]
            grads = list(torch.autograd.grad(population_loss(leaves, m_in, m_out, V, torch.diag(sx)),
                                             leaves))
            bound = bound + lr**2 * torch.stack([
                _fro(grads[k] @ grads[k].transpose(1, 2) - grads[k + 1].transpose(1, 2) @ grads[k + 1])
                for k in range(len(Ws) - 1)]).sum(0).max()
        Ws = [(W - lr * gW).detach() for W, gW in zip(Ws, grads)]
        if (t + 1) % every == 0:
            rho, cos = measures(balance_sides(Ws, m_in, m_out, V, sx, se))
            recs.append((t + 1, rho, cos))
            ctx.log(t + 1, optimizer=kind, lr=lr, imbalance_mean=float(rho.mean()),
                    cosine_mean=float(cos.mean()))
    if not all(bool(torch.isfinite(W).all()) for W in Ws):
        raise FloatingPointError(f"{kind} diverged; lower lr_start")
    return Ws, recs, float(bound), J0


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
    _, recs, _, _ = runs[cfg.optimizer]
    rho, cos = recs[-1][1], recs[-1][2]
    worst = float(rho.mean(0).max()) if np.all(np.isfinite(rho)) else float("nan")
    label = cfg.optimizer.upper()
    ctx.predict(f"{label}: balance E‖h_(k−1)‖²C_δ,k = E‖δ_(k+1)‖²C_h,k at every hidden layer "
                "(max over layers of the chain-mean ρ_k)", worst, 0.0, cfg.tolerance,
                sense="at_most",
                why="exact at the η → 0 equilibrium; at η_end the weights fluctuate by O(√η_end) "
                    "around it and relaxation ∝ 1/(η²·noise) is incomplete in a finite run "
                    "(the same allowance as platonic-linear's kernel distance)")
    ctx.predict(f"{label}: cosine of C_h,k and C_δ,k (min over layers of the chain mean)",
                float(cos.mean(0).min()), 1.0, cfg.tolerance, sense="at_least",
                why="1 at the exact equilibrium (C_h ∝ C_δ); the same allowance τ as for ρ_k")
    Wg, _, bound, J0 = runs["gd"]
    Jg = torch.stack([Wg[k] @ Wg[k].transpose(1, 2) - Wg[k + 1].transpose(1, 2) @ Wg[k + 1]
                      for k in range(len(Wg) - 1)])
    drift = float((Jg - J0).flatten(2).norm(dim=2).sum(0).max())
    ctx.predict("control: GD keeps its charges W_kW_kᵀ − W_(k+1)ᵀW_(k+1) (max drift)", drift, 0.0,
                bound + 1e-10, sense="at_most", control=True,
                why="exact step identity: the charge moves by η²(g_kg_kᵀ − g_(k+1)ᵀg_(k+1)) per step; "
                    "their summed norms bound the drift")
    ctx.record(imbalance_final={k: r[-1][1].tolist() for k, (_, r, _, _) in runs.items()},
               cosine_final={k: r[-1][2].tolist() for k, (_, r, _, _) in runs.items()},
               gd_charge_drift=drift, gd_charge_bound=bound)
    _figure(cfg, ctx, {k: v[1] for k, v in runs.items()})


def _figure(cfg: ForwardBackwardConfig, ctx: RunContext,
            recs: dict[str, list[tuple[int, np.ndarray, np.ndarray]]]) -> None:
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
    a1.axhline(cfg.tolerance, color="gray", ls=":", label="tolerance")
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
        quick=ForwardBackwardConfig(steps=20_000),
        full=ForwardBackwardConfig(),
        run=run,
        cost="full: 4 chains × 60k online SGD steps + the GD control, ~32 s on one core",
    )
)

