"""Pure checks of ``gpt-balance`` on recorded traces (numpy, float64).

Identity. One plain SGD step θ' = θ − η(g + wd·θ), decay on every parameter of the orbit, changes
the charge exactly to ``J' = (1 − η·wd)²J + η²·gᵀAg`` (docs/theory.md §2). In floating point each
updated entry is rounded twice (product, subtraction) and each charge entry is a sum of ≤ 2³⁰
squares (pairwise-summed, in and out), so the residual of an entry is bounded by
``KAPPA·ε·(P_t + P_{t+1} + η²·(e_in + e_out))`` with ``P`` the gross ``Σ_in‖M‖² + Σ_out‖M‖²`` of
that unit/head and ``KAPPA = 2·(2 + 30)`` ulp (Cauchy–Schwarz bounds every entry of a head's
matrix charge by its gross). ``identity_ratio`` is the largest residual over that bound: ≤ 1 when
the identity holds to round-off.

Weight-decay law. The identity is linear in J, so the charge splits exactly into the decaying
memory of its start and a noise-driven part: ``J_t = (1 − η·wd)^{2t}·J_0 + N_t`` with
``N_{t+1} = (1 − η·wd)²N_t + η²·gᵀAg_t``, ``N_0 = 0``. ``N`` relaxes to its stationary level within
a few ``τ = 1/(η·wd(2 − η·wd))`` whatever ``J_0``, while the memory term needs
``τ·ln(|J_0|/|N|)`` to fall below ``N`` (≈ 10τ for a LayerNorm gain that starts at 1). Summing the
identity over a window, the mean of ``x_t = gᵀAg_t − c·N_t`` with ``c = wd(2 − η·wd)/η`` is
``(N_end − N_start)/(η²·n)`` exactly: it vanishes when the noise-driven charge has stopped
drifting (stationarity), which is the law ``E[gᵀAg] = c·E[N]`` (``= c·E[J]`` once the start is
forgotten; gradient balance ``E[gᵀAg] = 0`` for ``wd = 0``). Checked per group (a head's trace for the attention rotations, a layer's
sum over units for the rescales) with block-mean standard errors: ``z = mean/se``, and the
family-wise limit is the two-sided Student-t quantile with Bonferroni correction over the groups.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from neurothermo.symmetry.base import Symmetry

KAPPA = 2 * (2 + 30)
EPS64 = float(np.finfo(np.float64).eps)


def identity_ratio(charge: np.ndarray, gag: np.ndarray, gross: np.ndarray, e_sum: np.ndarray,
                   lr: float, wd: float, eps: float = EPS64) -> float:
    """max over steps and entries of ``|J_{t+1} − (1−η·wd)²J_t − η²·gAg_t| / bound``.

    ``charge``: ``(T+1, *shape)``; ``gag``: ``(T, *shape)``; ``gross``: ``(T+1, groups)``;
    ``e_sum``: ``(T, groups)`` (``e_in + e_out``). ``shape`` is ``(groups,)`` for rescales or
    ``(groups, d, d)`` for rotations; a single block's ``(d, d)`` counts as one group.
    """
    pred = (1.0 - lr * wd) ** 2 * charge[:-1] + lr**2 * gag
    resid = np.abs(charge[1:] - pred)
    bound = KAPPA * eps * (gross[:-1] + gross[1:] + lr**2 * e_sum)  # (T, groups)
    resid = resid.reshape(resid.shape[0], bound.shape[1], -1)
    return float((resid / bound[:, :, None]).max())


def group_series(charge: np.ndarray, gag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scalar charge and imbalance per group: trace per head (rotations) or Σ over units."""
    if charge.ndim >= 3:  # (T, [groups,] d, d)
        tr = np.trace(charge, axis1=-2, axis2=-1)
        tg = np.trace(gag, axis1=-2, axis2=-1)
        return tr.reshape(tr.shape[0], -1), tg.reshape(tg.shape[0], -1)
    return charge.sum(1, keepdims=True), gag.sum(1, keepdims=True)


@dataclass(frozen=True)
class WdLaw:
    """The weight-decay law on a window, per group: means, standard errors and ``z``."""

    gag: np.ndarray  # ⟨gᵀAg⟩ per group
    cj: np.ndarray  # c·⟨N⟩ per group (N: the noise-driven part of J)
    resid: np.ndarray  # ⟨gᵀAg − c·J⟩
    se: np.ndarray
    z: np.ndarray
    drift: np.ndarray  # (N_end − N_start)/(η²·n): equals resid exactly (identity)


def law_constant(lr: float, wd: float) -> float:
    """``c = wd(2 − η·wd)/η`` of the law ``E[gᵀAg] = c·E[N]`` (torch's ``wd``; ``γ = wd/2``)."""
    return wd * (2.0 - lr * wd) / lr


def law_from_blocks(block_sums: np.ndarray, sizes: np.ndarray, sum_gag: np.ndarray,
                    sum_cn: np.ndarray, n_start: np.ndarray, n_end: np.ndarray, lr: float
                    ) -> WdLaw:
    """The law from streamed sums over a window of ``n = Σ sizes`` steps, per group.

    ``block_sums``: ``(n_blocks, groups)`` sums of ``x_t = gᵀAg_t − c·N_t`` over consecutive blocks
    of ``sizes`` steps; ``sum_gag``, ``sum_cn``: the window sums of ``gᵀAg`` and ``c·N``;
    ``n_start``, ``n_end``: ``N`` at the window's first step and after its last (for the drift).
    ``se`` is the standard error of the window mean from the spread of the block means.
    """
    n = float(sizes.sum())
    means = block_sums / sizes[:, None]
    mean = block_sums.sum(0) / n
    nb = block_sums.shape[0]
    se = means.std(0, ddof=1) / math.sqrt(nb)
    drift = (n_end - n_start) / (lr**2 * n)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, mean / se, np.where(mean == 0, 0.0, np.inf))
    return WdLaw(sum_gag / n, sum_cn / n, mean, se, z, drift)


def block_sizes(n: int, n_blocks: int) -> np.ndarray:
    """Sizes of ``n_blocks`` consecutive near-equal blocks of ``n`` steps (as ``np.array_split``)."""
    q, r = divmod(n, n_blocks)
    return np.array([q + 1] * r + [q] * (n_blocks - r), dtype=np.float64)


def wd_law(j: np.ndarray, gag: np.ndarray, lr: float, wd: float, start: int, n_blocks: int,
           stop: int | None = None) -> WdLaw:
    """The law on whole recorded series (reference for the streamed version).

    ``j``: ``(T+1, groups)`` scalar charges, ``gag``: ``(T, groups)``; window ``[start, stop)``
    (``stop`` defaults to T). The law is checked on the noise-driven part ``N`` of ``J``."""
    stop = gag.shape[0] if stop is None else stop
    c = law_constant(lr, wd)
    t = np.arange(j.shape[0], dtype=np.float64)[:, None]
    j = j - (1.0 - lr * wd) ** (2 * t) * j[:1]
    j, gag = j[:stop + 1], gag[:stop]
    x = gag[start:] - c * j[start:-1]
    sums = np.stack([b.sum(0) for b in np.array_split(x, n_blocks, axis=0)])
    return law_from_blocks(sums, block_sizes(x.shape[0], n_blocks), gag[start:].sum(0),
                           c * j[start:-1].sum(0), j[start], j[-1], lr)


def decay_exponent(gross_start: np.ndarray, gross_end: np.ndarray, lr: float, wd: float,
                   n: int) -> np.ndarray:
    """The law's premise: ``κ = ln(P_end/P_start) / ln((1 − η·wd)^{2n})`` of a group's gross
    ``P = Σ_in‖M‖² + Σ_out‖M‖²`` over a window of ``n`` steps.

    Two regimes are derived: a group the loss keeps (its gradient balances the decay) has a
    stationary gross, ``κ ≈ 0``; a group the loss does not train (its gradient ≪ ``wd·θ``, e.g.
    W_Q and W_K while the attention logits do not matter: each gets a gradient only through the
    other) shrinks by ``(1 − η·wd)²`` per step, ``κ ≈ 1``, and its noise decays with it, so the
    law's stationarity is absent. ``κ < 1/2`` (nearer the stationary regime) is the premise.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa: np.ndarray = np.log(gross_end / gross_start) / (2 * n * math.log1p(-lr * wd))
    return kappa


def trend(block_sums: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The drift of a quantity across a window from its block sums: ``(z, growth)`` per group.

    ``block_sums``: ``(n_blocks, groups)`` sums over consecutive blocks of ``sizes`` steps. The
    block means ``m_b`` are regressed on the blocks' mid-steps ``s_b`` (least squares);
    ``z = slope / SE(slope)`` (``n_blocks − 2`` dof) and ``growth = slope·n / mean(m_b)``, the
    fitted change over the window's ``n`` steps in units of the window mean. For a stationary
    quantity whose blocks are long against its correlation time the block means are independent
    and ``z`` is Student-t; a quantity still growing or shrinking gives ``|z| ≫ 1``.
    """
    means = block_sums / sizes[:, None]
    mid = (np.cumsum(sizes) - sizes / 2.0)[:, None]
    xc = mid - mid.mean(0)
    sxx = float((xc**2).sum())
    slope = (xc * (means - means.mean(0))).sum(0) / sxx
    resid = means - means.mean(0) - slope * xc
    dof = means.shape[0] - 2
    se = np.sqrt((resid**2).sum(0) / max(dof, 1) / sxx)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, slope / se, np.where(slope == 0, 0.0, np.inf))
        growth = slope * float(sizes.sum()) / means.mean(0)
    return z, growth


def z_limit(n_blocks: int, n_tests: int, alpha: float, dof: int | None = None) -> float:
    """Two-sided Student-t limit (``n_blocks − 1`` dof unless ``dof``) at family-wise level
    ``alpha`` (Bonferroni over ``n_tests``)."""
    from scipy.stats import t

    return float(t.ppf(1.0 - alpha / (2 * max(n_tests, 1)),
                       n_blocks - 1 if dof is None else dof))


def role_energy(sym: Symmetry, source: Mapping[str, Tensor], role: str) -> Tensor:
    """``Σ_role ‖M‖²`` per unit (rescale) or per head (double rotation): shape ``(n_groups,)``."""
    total: Tensor | None = None
    for s in sym.slices:
        if s.role != role:
            continue
        u = s.unit_view(source[s.name].detach())
        q = u.reshape(sym.n_units, -1).square().sum(1)
        total = q if total is None else total + q
    if total is None:
        raise ValueError(f"{sym}: no {role!r} slices")
    return total.reshape(-1, sym.block).sum(1) if sym.block > 1 else total
