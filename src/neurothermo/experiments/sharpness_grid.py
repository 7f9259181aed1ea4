"""The (η × p) grid of ``sharpness-phase`` as one batched simulation, and its per-cell statistics."""
from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from neurothermo.experiments import sharpness_model as sm
from neurothermo.experiments.base import RunContext

if TYPE_CHECKING:
    from neurothermo.experiments.sharpness_phase import SharpnessPhaseConfig

DT = torch.float64


def grid_cells(lrs: tuple[float, ...], ps: tuple[float, ...], seeds: int, reading: str, k: float,
           noise: float) -> dict[str, Tensor]:
    """Per-chain tensors for a (η × p × seed) grid: lr, p, k, sx, se, λ₀, λ*."""
    E = torch.tensor(lrs, dtype=DT).repeat_interleave(len(ps) * seeds)
    P = torch.tensor(ps, dtype=DT).repeat_interleave(seeds).repeat(len(lrs))
    cov = [sm.covariances(float(p), reading) for p in ps]
    sx = torch.tensor([c[0] for c in cov], dtype=DT).repeat_interleave(seeds, 0).repeat(len(lrs), 1)
    se = torch.tensor([c[1] for c in cov], dtype=DT).repeat_interleave(seeds, 0).repeat(len(lrs), 1)
    kk = torch.full_like(E, k)
    lam_star = sm.equilibrium_sharpness(sx, se, kk)          # noise scale does not move the balance
    return {"lr": E, "p": P, "k": kk, "sx": sx, "se": se * noise, "lam0": sm.start_sharpness(sx, kk), "lam_star": lam_star}


def sharp_start(lam_target: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``W₁ = diag(1, c)``, ``W₂ = diag(1, 1/c)``, ``c < 1``: a minimum of sharpness ``2K(1 + c⁻²)`` = target.

    (For ``Σ_x = diag(1, s₂ ≤ 1)`` the top pair is (output 2, input 1), so the formula holds for every
    reading.) ``lam_target > 4K`` is required.
    """
    c = (lam_target / (2 * k) - 1) ** -0.5
    one = torch.ones_like(c)
    return torch.diag_embed(torch.stack([one, c], 1)), torch.diag_embed(torch.stack([one, 1 / c], 1))


def grid_starts(cells: dict[str, Tensor], start: str) -> tuple[Tensor, Tensor]:
    C = cells["lr"].shape[0]
    if start == "balanced":
        eye = torch.eye(2, dtype=DT).repeat(C, 1, 1)
        return eye, eye.clone()
    # halfway between λ* and the stability limit 2/η (or 1.5·λ* when that is unstable anyway)
    target = torch.where(cells["lr"] * cells["lam_star"] < 2,
                         (cells["lam_star"] + 2 / cells["lr"]) / 2, 1.5 * cells["lam_star"])
    return sharp_start(target, cells["k"])


def _sum_in_order(x: Tensor, dim: int) -> Tensor:
    """Sum along ``dim`` one slice after another. torch's reductions may vectorise differently for
    different sizes of the other dimensions, which changes the last bits; this order depends on
    nothing but ``dim``, so a cell gives the same bits alone as inside the batched grid."""
    parts = x.unbind(dim)
    acc = parts[0].clone()
    for part in parts[1:]:
        acc += part
    return acc


def stationary(readings: Tensor) -> tuple[Tensor, Tensor]:
    """Per-chain time average over the second half of the readings, and NaN-marked divergence."""
    late = readings[readings.shape[0] // 2:]
    return _sum_in_order(late, 0) / late.shape[0], torch.isnan(readings).any(0)


def cell_stats(per_chain: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Average over the seeds of each cell (last axis) excluding diverged chains.

    Returns ``(mean, standard error, diverged)`` of shape ``shape``; a cell counts as diverged when any
    of its chains diverged (its mean is still NaN-free if others survive, but it is masked in figures
    and checks). Standard error: seed-to-seed spread / √n (independent chains).
    """
    x = per_chain.reshape(*shape, -1)
    ok = ~torch.isnan(x)
    n = ok.sum(-1)
    zero = torch.zeros_like(x)
    mean = _sum_in_order(torch.where(ok, x, zero), -1) / n
    var = _sum_in_order(torch.where(ok, (x - mean[..., None]) ** 2, zero), -1) / (n - 1).clamp(min=1)
    se = (var / n.clamp(min=1)).sqrt()
    diverged = n < x.shape[-1]
    nan = torch.full_like(mean, float("nan"))
    return torch.where(diverged, nan, mean), torch.where(diverged, nan, se), diverged


def cell_stream(seed: int, label: str, role: str, lr: float, p: float) -> torch.Generator:
    """The random stream of one group of chains: a generator seeded by a hash of the run's seed,
    the grid's label, the group's role (``balanced``, ``sharp``, ``control``) and its cell ``(η, p)``.

    It depends on nothing else, so a cell simulated alone (a sweep cell: ``--set lr=… p=…``) draws
    exactly what it draws inside the batched grid.

    Example:
        >>> a, b = (cell_stream(0, "grid", "balanced", 0.5, 0.1) for _ in range(2))
        >>> torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))
        True
    """
    key = f"sharpness-phase|{seed}|{label}|{role}|{float(lr)!r}|{float(p)!r}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
                                         & (2**63 - 1))


def run_grid(cfg: SharpnessPhaseConfig, ctx: RunContext, g: torch.Generator, *, reading: str, k: float,
             batch: int, seeds: int, sharp: bool = False, label: str = "grid",
             seed: int | None = None) -> dict[str, Tensor]:
    """All (η, p, seed) chains of one reading as one batched simulation; per-cell statistics.

    With ``sharp``, the same tensor also carries, for every cell with ``η·λ* < 2``, chains started
    sharper than λ* (keys ``sharp_*``; NaN where absent or diverged), and for every η control chains on
    balanced data ``p = 1`` (keys ``ctrl_*``): there λ* = λ₀, so their time-averaged λ_max measures the
    upward bias that fluctuations alone give a top eigenvalue (Jensen: λ_max is convex).

    With ``seed`` (the run's seed) every group of chains draws from its own :func:`cell_stream`
    instead of ``g``, and ``g`` is left untouched: each cell's numbers are then the same whether the
    grid runs here in one batch or cell by cell (a declared sweep over ``lr`` and ``p``).
    """
    cells = grid_cells(cfg.lrs, cfg.ps, seeds, reading, k, cfg.label_noise)
    C = cells["lr"].shape[0]
    W1, W2 = grid_starts(cells, "balanced")
    idx = torch.nonzero(cells["lr"] * cells["lam_star"] < 2).flatten() if sharp else torch.zeros(0, dtype=torch.long)
    sub = {key: v[idx] for key, v in cells.items()}
    S1, S2 = grid_starts(sub, "sharp")
    # control chains: balanced data (p = 1) at every η: what fluctuations alone do to λ_max
    ctrl = grid_cells(cfg.lrs, (1.0,), seeds, reading, k, cfg.label_noise) if sharp else {
        key: v[:0] for key, v in cells.items()}
    C1, C2 = grid_starts(ctrl, "balanced")
    n_sub = len(idx)
    run_cells = {key: torch.cat([v, sub[key], ctrl[key]]) for key, v in cells.items()}
    W1, W2 = torch.cat([W1, S1, C1]), torch.cat([W2, S2, C2])
    lam_start = sm.sharpness(W1, W2, run_cells["sx"], run_cells["k"])
    streams: sm.Streams = g
    if seed is not None:
        pts = [(lr, p) for lr in cfg.lrs for p in cfg.ps]
        stable = (cells["lr"] * cells["lam_star"] < 2)[::seeds].tolist() if sharp else [False] * len(pts)
        streams = ([(cell_stream(seed, label, "balanced", lr, p), seeds) for lr, p in pts]
                   + [(cell_stream(seed, label, "sharp", lr, p), seeds)
                      for (lr, p), st in zip(pts, stable, strict=True) if st]
                   + ([(cell_stream(seed, label, "control", lr, 1.0), seeds) for lr in cfg.lrs]
                      if sharp else []))
    with ctx.progress(f"SGD on the (η, p) grid: {label}", cfg.steps) as advance:
        lam, Q, *_ = sm.simulate(W1, W2, lr=run_cells["lr"], k=run_cells["k"], sx=run_cells["sx"],
                              se=run_cells["se"], batch=batch, steps=cfg.steps, every=cfg.hessian_every,
                              generator=streams, advance=advance)
    per_chain, _ = stationary(lam)
    shape = (len(cfg.lrs), len(cfg.ps))
    mean, se, div = cell_stats(per_chain[:C], shape)
    drift = charge_drift(Q, W1, W2, run_cells)
    first = slice(None, None, seeds)
    d_mean, d_se, _ = cell_stats(drift[:C], shape)
    a2 = sm.equilibrium_scales(cells["sx"], cells["se"].clamp(min=1e-300)) ** 2
    trq_star = (a2 - 1 / a2).sum(1)[first].reshape(shape)
    out = {"lam": mean, "se": se, "diverged": div, "drift": d_mean, "drift_se": d_se, "trq_star": trq_star,
           "lam0": cells["lam0"][first].reshape(shape), "lam_star": cells["lam_star"][first].reshape(shape),
           "start": lam_start[:C][first].reshape(shape), "lr": cells["lr"][first].reshape(shape),
           "p": cells["p"][first].reshape(shape)}
    if sharp:
        full = torch.full((C,), float("nan"), dtype=DT)
        present = torch.zeros(C, dtype=torch.bool)
        present[idx] = True
        chains, starts, drifts = full.clone(), full.clone(), full.clone()
        chains[idx], starts[idx] = per_chain[C:C + n_sub], lam_start[C:C + n_sub]
        drifts[idx] = drift[C:C + n_sub]
        dm, ds, _ = cell_stats(drifts, shape)
        out.update(sharp_drift=dm, sharp_drift_se=ds)
        m, s, _ = cell_stats(chains, shape)
        has = present.reshape(*shape, -1).all(-1)
        out.update(sharp_lam=m, sharp_se=s, sharp_start=starts[first].reshape(shape), sharp_present=has,
                   sharp_diverged=has & torch.isnan(m))
        cm, cs, _ = cell_stats(per_chain[C + n_sub:], (len(cfg.lrs), 1))
        out.update(ctrl_lam=cm.expand(shape), ctrl_se=cs.expand(shape))
    return out


def charge_drift(Q: Tensor, W1: Tensor, W2: Tensor, cells: dict[str, Tensor]) -> Tensor:
    """Per chain: how far the second-half mean of ``Tr Q = ‖W₁‖² − ‖W₂‖²`` moved toward its
    noise-balanced value, ``d = (Tr Q̄ − Tr Q_start)·sign(Tr Q*)`` with ``Tr Q* = Σ_l (a_l² − a_l⁻²)``.

    ``Tr Q`` is linear in ``Q`` (fluctuations do not bias its mean, unlike ``λ_max``, a convex function
    of the weights) and invariant under the hidden-unit rotations ``W₁ → OW₁, W₂ → W₂Oᵀ`` along which
    the iterates diffuse freely. ``W1, W2`` are the starts; NaN for diverged chains.
    """
    a2 = sm.equilibrium_scales(cells["sx"], cells["se"].clamp(min=1e-300)) ** 2
    target = (a2 - 1 / a2).sum(1)
    late = (_sum_in_order(Q[Q.shape[0] // 2:], 0) / (Q.shape[0] - Q.shape[0] // 2)).diagonal(
        dim1=-2, dim2=-1).sum(-1)
    start = sm.charge(W1, W2).diagonal(dim1=-2, dim2=-1).sum(-1)
    return (late - start) * torch.sign(target)


def picture_metrics(res: dict[str, Tensor]) -> dict[str, float]:
    """Numbers that compare a grid with the paper's phase diagram (colour 0.6 … 2.0, ≈ 2 below p = η²/2).

    ``min``/``max`` of ``η·λ_max`` over converged cells; ``saturated_below_curve``: fraction of cells with
    ``p < η²/2`` whose ``η·λ_max ≥ 1.8``; ``onset_ratio``: median over ``η`` of (largest ``p`` with
    ``η·λ_max ≥ 1.9``) / (η²/2) (NaN if no cell saturates); ``diverged``: fraction of diverged cells;
    ``distance``: ``|min − 0.6| + |max − 2| + (1 − saturated_below_curve) + diverged``, smaller is closer.
    """
    v = res["lr"] * res["lam"]
    ok = ~res["diverged"]
    if not bool(ok.any()):
        return {"min": math.nan, "max": math.nan, "saturated_below_curve": 0.0, "onset_ratio": math.nan,
                    "diverged": 1.0, "distance": math.inf}
    below = (res["p"] < res["lr"] ** 2 / 2) & ok
    sat = float(((v >= 1.8) & below).sum() / below.sum()) if bool(below.any()) else 0.0
    ratios = []
    for i in range(v.shape[0]):
        hit = (v[i] >= 1.9) & ok[i]
        if bool(hit.any()):
            ratios.append(float(res["p"][i][hit].max()) / (float(res["lr"][i, 0]) ** 2 / 2))
    onset = float(torch.tensor(ratios).median()) if ratios else math.nan
    lo, hi = float(v[ok].min()), float(v[ok].max())
    div = float(res["diverged"].float().mean())
    return {"min": lo, "max": hi, "saturated_below_curve": sat, "onset_ratio": onset, "diverged": div,
                "distance": abs(lo - 0.6) + abs(hi - 2.0) + (1 - sat) + div}
