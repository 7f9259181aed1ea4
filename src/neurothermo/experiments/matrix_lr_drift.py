"""The entropic force in Λ-geometry against the drift of preconditioned SGD on an Adam-trained MLP.

Used by the ``matrix-lr`` experiment. A tanh MLP on ``N`` digits (mean-reduced cross-entropy,
float64) is trained with Adam (β₁ = 0, so Adam's update is exactly ``θ − lr·Λ_t·g_B``); at that point
Λ is frozen from the second moments, ``Λ = diag(1/(√v̂ + ε))`` with torch's bias correction
``v̂ = v/(1 − β₂ᵗ)`` (:func:`neurothermo.preconditioner_from`). From there, one epoch of
preconditioned SGD ``θ ← θ − ηΛ∇L_B`` with random reshuffling — the N samples split into
``m = N/b`` batches of ``b`` drawn *without* replacement — is run over many independent
reshufflings. Expanding the epoch to second order in η and averaging over the orderings gives

    E θ_m = Φ_L(T) + T·Λ·F_Λ + O(η³),   T = mη,
    F_Λ = −(η/4)∇E_B[g_BᵀΛg_B] = −(η/4)∇[∇LᵀΛ∇L + Tr(ΛΣ_B)],   Tr(ΛΣ_B) = f·Tr(ΛΣ),

``Φ_L`` the Λ-gradient flow ``θ̇ = −Λ∇L``, ``Σ`` the per-sample gradient covariance (1/N) and
``f = (N − b)/(b(N − 1))`` (without replacement): the mean epoch follows the Λ-flow of the entropic
loss in Λ-geometry ``L + (η/4)∇LᵀΛ∇L + (η/4)Tr(ΛΣ_B)``. (Derivation: the η² term of the epoch is
``η²Λ Σ_{j<k} H_kΛg_j``; over a random partition ``Σ_{j≠k} H_kΛg_j = m²HΛg − Σ_k H_kΛg_k``, so its
mean is ``½(m²HΛg − m·E_B[H_BΛg_B])``; the flow supplies ``½m²HΛg``; and ``H_BΛg_B = ½∇(g_BᵀΛg_B)``.)
The first-order noise of the epoch cancels exactly (``Σ_k g_{B_k} = m∇L`` for a partition), so the
spread of ``θ_m`` is itself ``O(η²)``.

``F_Λ`` is computed with the library's :func:`neurothermo.functional_entropic_force` and the frozen
Λ: ``E_B[H_BΛg_B] = (1 − f)·HΛg + f·(1/N)Σ_i H_iΛg_i`` (the pair probabilities of a uniform b-subset
drawn without replacement), i.e. ``F_Λ = (1 − f)·F(all N samples) + f·mean_i F(sample i)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from neurothermo.entropic import (
    Preconditioner,
    functional_entropic_force,
    functional_flow,
    preconditioner_from,
)
from neurothermo.experiments._common import pyplot
from neurothermo.experiments._runs import digits_subset, top_eigenvalue
from neurothermo.experiments.base import RunContext

Params = dict[str, Tensor]


def without_replacement_factor(n: int, b: int) -> float:
    """``f = Tr Σ_B / Tr Σ = (N − b)/(b(N − 1))`` for b of N samples drawn without replacement."""
    if not 1 <= b <= n or n < 2:
        raise ValueError(f"need 1 ≤ b ≤ N and N ≥ 2, got b={b}, N={n}")
    return (n - b) / (b * (n - 1))


def expected_batch_force(objective: Callable[[Tensor], Callable[[Params], Tensor]], n: int, b: int,
                         theta: Params, lr: float, pre: Preconditioner | None) -> Params:
    """``F = −(lr/4)∇E_B[g_BᵀΛg_B]`` over uniform b-subsets of the N samples, without replacement.

    ``objective(idx)`` is the mean-reduced loss on the samples ``idx`` as a function of a parameter
    dict. ``F = (1 − f)·F(all) + f·(1/N)Σ_i F(i)``, ``f = (N − b)/(b(N − 1))``, each ``F(·)`` being
    :func:`neurothermo.functional_entropic_force` with ``pre`` (None: Λ = I). N + 1 Hessian-vector
    products.
    """
    f = without_replacement_factor(n, b)
    full = functional_entropic_force(objective(torch.arange(n)), theta, lr=lr, preconditioner=pre)
    out = {k: (1 - f) * v for k, v in full.items()}
    for i in range(n):
        fi = functional_entropic_force(objective(torch.tensor([i])), theta, lr=lr, preconditioner=pre)
        for k in out:
            out[k] = out[k] + (f / n) * fi[k]
    return out


@dataclass(frozen=True)
class AdamPoint:
    """An MLP after Adam training: data, parameters, Λ frozen there and Adam's own state."""

    model: nn.Module
    x: Tensor
    y: Tensor
    theta: Params
    pre: Preconditioner
    exp_avg_sq: Params
    step: int
    beta2: float
    eps: float


def train_with_adam(model: nn.Module, x: Tensor, y: Tensor, *, steps: int, lr: float, batch: int,
                    seed: int, beta2: float = 0.999) -> AdamPoint:
    """Adam (β₁ = 0, β₂, ε = 1e-8) on batches of ``batch`` drawn with replacement; Λ frozen at the end."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, beta2))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        opt.zero_grad()
        torch.autograd.backward(F.cross_entropy(model(x[idx]), y[idx]))
        opt.step()
    pre = preconditioner_from(opt, model)
    named = dict(model.named_parameters())
    state = {k: opt.state[p] for k, p in named.items()}
    return AdamPoint(model=model, x=x, y=y, theta={k: p.detach().clone() for k, p in named.items()},
                     pre=pre, exp_avg_sq={k: s["exp_avg_sq"].detach().clone() for k, s in state.items()},
                     step=int(next(iter(state.values()))["step"]), beta2=beta2, eps=1e-8)


@dataclass(frozen=True)
class EpochDrift:
    """Mean over ``replicates`` reshuffled epochs of ``θ_m − ref`` and its standard error (flat)."""

    mean: Tensor
    se: Tensor
    replicates: int


def reshuffled_epochs(point: AdamPoint, lr: float, batch: int, replicates: int, ref: Params,
                      seed: int, *, adam: bool = False, chunk: int = 1000) -> EpochDrift:
    """One epoch (``m = N/b`` steps, a fresh random partition per replicate) from ``point.theta``.

    ``adam=False``: preconditioned SGD ``θ ← θ − lr·Λ·∇L_B`` with the frozen Λ. ``adam=True``: Adam
    (β₁ = 0) continued from its state, Λ moving: ``v ← β₂v + (1 − β₂)g_B²``,
    ``θ ← θ − lr·g_B/(√(v/(1 − β₂ᵗ)) + ε)``. Replicates run vectorised in chunks; the deviations
    from ``ref`` are accumulated (float64) for the mean and its standard error.
    """
    n = len(point.y)
    if n % batch:
        raise ValueError(f"the batch size {batch} must divide the N = {n} samples of an epoch")
    m = n // batch
    model, x, y = point.model, point.x, point.y

    def loss(p: Params, xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    batch_grad = vmap(grad(loss))
    gen = torch.Generator().manual_seed(seed)
    s1 = s2 = None
    done = 0
    while done < replicates:
        r = min(chunk, replicates - done)
        P = {k: v.expand(r, *v.shape).clone() for k, v in point.theta.items()}
        V = {k: v.expand(r, *v.shape).clone() for k, v in point.exp_avg_sq.items()}
        perm = torch.argsort(torch.rand(r, n, generator=gen), dim=1)
        for k in range(m):
            idx = perm[:, k * batch:(k + 1) * batch]
            G = batch_grad(P, x[idx], y[idx])
            if adam:
                bias2 = 1 - point.beta2 ** (point.step + k + 1)
                for nm in P:
                    V[nm] = point.beta2 * V[nm] + (1 - point.beta2) * G[nm] ** 2
                    P[nm] = P[nm] - lr * G[nm] / ((V[nm] / bias2).sqrt() + point.eps)
            else:
                P = {nm: P[nm] - lr * point.pre.diag[nm] * G[nm] for nm in P}
        dev = torch.cat([(P[nm] - ref[nm]).reshape(r, -1) for nm in P], dim=1)
        s1 = dev.sum(0) if s1 is None else s1 + dev.sum(0)
        d2 = (dev**2).sum(0)
        s2 = d2 if s2 is None else s2 + d2
        done += r
    assert s1 is not None and s2 is not None
    mean = s1 / replicates
    var = (s2 / replicates - mean**2).clamp_min(0) * replicates / max(replicates - 1, 1)
    return EpochDrift(mean=mean, se=(var / replicates).sqrt(), replicates=replicates)


def flat(d: Params) -> Tensor:
    """A parameter dict as one flat vector (insertion order)."""
    return torch.cat([v.reshape(-1) for v in d.values()])


def relative_error_bound(se: Tensor, predicted: Tensor, remainder: float,
                         alpha: float = 1e-3) -> tuple[float, float]:
    """``(ε, ε_stat)``: the accepted ``‖D_meas − D_pred‖/‖D_pred‖``.

    ``ε_stat``: the norm of the Monte-Carlo error of the mean, ``√(Σse_j²)``, at its one-sided
    ``1 − alpha`` quantile — ``‖e‖`` of k_eff independent normal directions concentrates at
    ``√(Σse²)`` with relative spread ``1/√(2k_eff)``, ``k_eff = (Σse²)²/Σse⁴`` — over ``‖D_pred‖``.
    ``ε = ε_stat + remainder`` (the relative size of the neglected O(η³) terms).
    """
    s2 = se.pow(2)
    k_eff = float(s2.sum() ** 2 / s2.pow(2).sum()) if float(s2.sum()) > 0 else 1.0
    z = NormalDist().inv_cdf(1 - alpha)
    eps_stat = math.sqrt(float(s2.sum())) * (1 + z / math.sqrt(2 * k_eff)) / float(predicted.norm())
    return eps_stat + remainder, eps_stat


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two flat vectors."""
    return float(a @ b / (a.norm() * b.norm()))


def matrix_lr_drift_check(cfg: Any, ctx: RunContext) -> dict[str, Any]:
    """Run the drift part of ``matrix-lr`` (settings ``drift_*`` and ``correction`` of ``cfg``),
    record its predictions in ``ctx`` and return the measurements (plain floats and lists)."""
    from neurothermo.models import mlp

    n, b = cfg.drift_n_data, cfg.drift_batch
    if b > n or n % b:
        raise ValueError(f"drift_batch = {b} must divide drift_n_data = {n} (one epoch = N/b batches)")
    m = n // b
    x, y = digits_subset(n, ctx.seed)
    torch.manual_seed(ctx.seed)
    model = mlp([64, cfg.drift_hidden, 10], "tanh").double()
    point = train_with_adam(model, x, y, steps=cfg.drift_train_steps, lr=0.01, batch=b, seed=ctx.seed)

    def objective(idx: Tensor) -> Callable[[Params], Tensor]:
        return lambda p: F.cross_entropy(functional_call(model, p, (x[idx],)), y[idx])

    theta, pre, everyone = point.theta, point.pre, torch.arange(n)
    lam_diag = dict(pre.diag)
    lam = top_eigenvalue(objective(everyone), theta, lam_diag)
    part = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))
    lam_b = max(top_eigenvalue(objective(part[k * b:(k + 1) * b]), theta, lam_diag) for k in range(m))
    lam_flat = flat({k: pre.diag[k].expand_as(v) for k, v in theta.items()})
    rows: list[dict[str, Any]] = []
    scatter: dict[str, list[float]] = {}
    for j, xx in enumerate(ctx.track(cfg.drift_x, "drift: epoch times")):
        lr = xx / (m * lam)
        T = m * lr
        ref = functional_flow(objective(everyone), theta, time=T, steps=4, preconditioner=pre)
        sgd = reshuffled_epochs(point, lr, b, cfg.drift_replicates, ref, ctx.seed + 1 + j)
        adam = reshuffled_epochs(point, lr, b, cfg.drift_replicates, ref, ctx.seed + 1 + j, adam=True)
        pred = T * lam_flat * flat(expected_batch_force(objective, n, b, theta, lr, pre))
        ident = T * lam_flat * flat(expected_batch_force(objective, n, b, theta, lr, None))
        disc = T * lam_flat * flat(functional_entropic_force(objective(everyone), theta, lr=lr,
                                                              preconditioner=pre))
        # Adam's effective scalar learning rate c̄ = gᵀΛg/gᵀg: Λ → c̄·I keeps the scale, drops the matrix
        leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        gvec = flat(dict(zip(leaves, torch.autograd.grad(objective(everyone)(leaves),
                                                          list(leaves.values())))))
        c_bar = float((gvec * lam_flat * gvec).sum() / (gvec * gvec).sum())
        scalar = c_bar * ident
        main = pred if cfg.correction == "lambda" else ident
        remainder = T * lam_b
        eps, eps_stat = relative_error_bound(sgd.se, main, remainder)
        eps_id, _ = relative_error_bound(sgd.se, ident, remainder)
        d = sgd.mean
        row = {"x": xx, "lr": lr, "c_bar": c_bar, "T": T, "eps": eps, "eps_stat": eps_stat,
               "remainder": remainder, "pred_norm": float(pred.norm()),
               "measured_norm": float(d.norm())}
        for key, v in (("lambda", pred), ("identity", ident), ("noise_off", disc),
                       ("scalar", scalar)):
            row[f"ratio_{key}"] = float(d.norm() / v.norm())
            row[f"cos_{key}"] = cosine(d, v)
            row[f"relerr_{key}"] = float((d - v).norm() / v.norm())
        row["adam_ratio"] = float(adam.mean.norm() / pred.norm())
        row["adam_cos"] = cosine(adam.mean, pred)
        row["adam_relerr"] = float((adam.mean - pred).norm() / pred.norm())
        rows.append(row)
        ctx.log(j, part="drift", **row)
        tag = f"Tλ = {xx:g}" + (" [identity in place of Λ]" if cfg.correction == "identity" else "")
        why = (f"ε = ε_stat + ε_rem = {eps_stat:.3g} + {remainder:.3g}: ε_stat the norm of the "
               f"Monte-Carlo error of the mean over {cfg.drift_replicates} reshuffled epochs at its "
               "0.999 quantile over ‖D_pred‖; ε_rem = Tλ_B, the relative size of the O(η³) terms "
               f"(one more factor ηΛH_B per step over the m = {m} steps), λ_B = {lam_b:.3g} the "
               "largest top eigenvalue of Λ^½H_BΛ^½ over the batches of a partition")
        ctx.predict(f"drift {tag}: ‖E θ_m − Φ_L(T)‖ / ‖T·Λ·F_Λ‖ (size of the entropic drift)",
                    float(d.norm() / main.norm()), 1.0, eps, why=why)
        ctx.predict(f"drift {tag}: cos(E θ_m − Φ_L(T), T·Λ·F_Λ) (direction)", cosine(d, main),
                    math.sqrt(max(1 - eps**2, 0.0)), 0.0, sense="at_least",
                    why="‖D_meas − D_pred‖ ≤ ε‖D_pred‖ implies cos ≥ √(1 − ε²); " + why)
        ctx.predict(f"drift Tλ = {xx:g} control: with the identity in place of Λ (T·Λ·F_I) the "
                    "prediction misses (relative error)", row["relerr_identity"], eps_id, 0.0,
                    sense="at_least", control=True,
                    why="F_I = −(η/4)∇E_B‖g_B‖² differs from F_Λ unless Λ ∝ I; it must lie outside "
                        "the same allowance ε (computed with ‖T·Λ·F_I‖)")
        if j == 0:
            scatter = {"measured": d.tolist(), "se": sgd.se.tolist(), "lambda": pred.tolist(),
                       "identity": ident.tolist()}
    return {"top_eigenvalue": lam, "top_eigenvalue_batches": lam_b, "n_data": n, "batch": b,
            "epoch_steps": m, "replicates": cfg.drift_replicates, "lambda_min": float(lam_flat.min()),
            "lambda_max": float(lam_flat.max()), "rows": rows, "scatter": scatter}


def drift_figure(ctx: RunContext, res: dict[str, Any]) -> None:
    """Measured against predicted drift (per coordinate) and the relative error against Tλ."""
    import numpy as np

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    sc = {k: np.asarray(v) for k, v in res["scatter"].items()}
    lo, hi = float(np.min(sc["lambda"])), float(np.max(sc["lambda"]))
    a1.errorbar(sc["lambda"], sc["measured"], yerr=sc["se"], fmt=".", ms=3, color="tab:blue",
                alpha=0.6, label="predicted T·Λ·F_Λ (Λ-geometry)")
    a1.plot(sc["identity"], sc["measured"], ".", ms=2, color="tab:gray", alpha=0.5,
            label="control: T·Λ·F_I (identity)")
    a1.plot([lo, hi], [lo, hi], "k:", label="measured = predicted")
    a1.set_xlim(1.5 * lo - 0.5 * hi, 1.5 * hi - 0.5 * lo)
    a1.set_xlabel("predicted drift per parameter")
    a1.set_ylabel("E θ_m − Φ_L(T) (mean ± s.e.)")
    a1.set_title(f"one reshuffled epoch, Tλ = {res['rows'][0]['x']:g}")
    a1.legend(fontsize=7)
    rows = res["rows"]
    xs = np.array([r["x"] for r in rows])
    for key, fmt, label in (("relerr_lambda", "o-", "preconditioned SGD vs T·Λ·F_Λ"),
                            ("adam_relerr", "s--", "Adam, moving Λ (measured only)"),
                            ("relerr_noise_off", "v:", "vs discretization term only"),
                            ("relerr_identity", "^:", "control: identity in place of Λ")):
        a2.loglog(xs, [r[key] for r in rows], fmt, label=label)
    a2.loglog(xs, [r["eps"] for r in rows], "k-", lw=1, label="allowance ε = ε_stat + Tλ_B")
    from matplotlib.ticker import NullFormatter

    a2.xaxis.set_minor_formatter(NullFormatter())
    a2.set_xlabel("epoch time in units of the Λ-flow time, Tλ")
    a2.set_ylabel("‖D_meas − D_pred‖ / ‖D_pred‖")
    a2.set_title("relative error of the predicted drift")
    a2.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=7)
    ctx.savefig(fig, "matrix_lr_drift")
