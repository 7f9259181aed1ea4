"""The predictions of ``layer-balance`` (see its module docstring for the theory and the runs)."""
from __future__ import annotations

from typing import Any

import numpy as np

from neurothermo.experiments.base import RunContext

Z = 3.0  # standard errors: 0.3 % false failures for a normal mean
FAMILY = 0.0027  # family-wise false-failure rate of the per-unit checks (same as 3 SE for one mean)

WHY_IDENTITY = ("J' = (1 − η·wd)²J + η²(e_in − e_out) exactly (the loss is rescale invariant, so the "
                "cross terms cancel); summed over the window both sides agree to round-off: the bound "
                "is 64 ulp of Σθ² per step (update rounding plus a pairwise sum of squares, in and out)")
WHY_BALANCE = ("wd = 0: mean imbalance = ΔJ/(η²T) exactly, so a stationary charge means balance; "
               "tolerance 3 batch-means SE (the block means are the blocks' charge drifts, so this "
               "asks for no more drift than J's own fluctuations)")
WHY_CONTROL = ("the same test must fail without the cause: GD has no noise (J only moves by η²ḡᵀAḡ, and "
               "ḡ vanishes as GD converges), a 10× smaller η relaxes J 100× slower; both keep their "
               "start's charge, so their orbits never relax (R < 3) whatever ratio their last "
               "gradients happen to have")
R_MIN = 3.0  # orbit relaxation times before the window: the start's offset is forgotten to e⁻³ ≈ 5 %
WHY_RELAX = ("along a unit's rescale orbit (in × a, out ÷ a) e_in ∝ a⁻², e_out ∝ a², so by the identity "
             "d ln a ≈ η²(e_in − e_out)/(2S) per step (S = ‖w‖² + b² + ‖v‖²) and the offset from the "
             "balance point decays at rate η²(e_in + e_out)/S; balance is the noise's doing only where "
             "the steps before the window hold R = Σ_t η²(Σe_in + Σe_out)/S ≥ 3 such relaxation "
             "times (memory of the off-balance start ≤ e⁻³); pair sums, S from the two layers' norms")
WHY_DEEP = ("|x| (the default balance_activation) passes gradient through every unit on every sample "
            "(slope ±1), so no unit's active set can shrink and drag its balance point: J becomes "
            "stationary at every depth (ReLU's keeps drifting as its units sparsify; measured in "
            "docs/experiments/layer-balance.md)")
WHY_WD = ("stationary mean of J' = (1 − η·wd)²J + η²(e_in − e_out): E[e_in − e_out] = wd(2 − η·wd)E[J]/η "
          "(torch's wd; paper γ = wd/2); the measured difference is exactly ΔJ/(η²T), tolerance 3 SE")


def unit_z_limit(n_units: int, n_blocks: int) -> float:
    """Student-t quantile for a per-unit check with family-wise false-failure rate ``FAMILY``.

    Each unit's drift is a mean over ``n_blocks`` batch means (t with n_blocks − 1 degrees of
    freedom); Bonferroni over ``n_units`` two-sided tests.
    """
    from scipy import stats

    return float(stats.t.ppf(1 - FAMILY / (2 * n_units), n_blocks - 1))


def unit_z(drift: np.ndarray, se: np.ndarray) -> np.ndarray:
    """|drift|/SE per unit; a unit with SE 0 (no gradient in the window) scores 0 if its drift is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(drift) / se
    return np.where(se > 0, z, np.where(drift == 0, 0.0, np.inf))


def check_balance(ctx: RunContext, k: str, s: dict[str, Any], why: str) -> None:
    """Layer balance (every pair's ratio) and neuron balance (every pair's slope) within 3 SE of 1,
    with its premise: the orbit relaxed (``R ≥ R_MIN`` relaxation times before the window)."""
    lb = s["lb"]
    for i, loc in enumerate(lb.pairs):
        ctx.predict(f"balance premise, {k}, {loc}: orbit relaxation times before the window, "
                    f"R = Σ η²(Σe_in + Σe_out)/S ≥ {R_MIN:g}", s["relax"][i], R_MIN, 0.0,
                    sense="at_least", why=WHY_RELAX)
        ctx.predict(f"layer balance, {k}, {loc}: Σ_u ⟨e_in⟩ / Σ_u ⟨e_out⟩ = 1",
                    lb.pair_ratio[i], 1.0, Z * lb.pair_ratio_se[i], why=why)
    if len(s["nb"]) < len(lb.pairs):
        ctx.predict(f"neuron balance, {k}: some hidden unit alive in every layer", float("nan"), 1.0,
                    0.0, why="a hidden layer whose every unit is dead has no neuron balance")
    for nb in s["nb"]:
        ctx.predict(f"neuron balance, {k}, {nb.location}: slope of ⟨e_out⟩ on ⟨e_in⟩ over units = 1",
                    nb.slope, 1.0, Z * nb.slope_se, why=why + "; SE of the slope over the blocks")


def check_all(ctx: RunContext, cfg: Any, runs: dict[str, Any], sums: dict[str, dict[str, Any]],
              early: tuple[Any, ...]) -> None:
    """Every prediction of the experiment, recorded through ``ctx.predict``."""
    for k, s in sums.items():
        for d in s["drift"]:
            ctx.predict(f"drift identity, {k}, {d.location}: mean η²-imbalance = (ΔJ + wd term)/(η²T), "
                        "every unit", d.error, 0.0, d.roundoff, sense="at_most", why=WHY_IDENTITY)
    check_balance(ctx, "reference", sums["reference"], WHY_BALANCE)
    for k in [k for k in sums if k.startswith("balance ") and "control" not in k]:
        check_balance(ctx, k, sums[k], WHY_BALANCE + "; " + WHY_DEEP)
    for k in ("GD control", "small-η control", "balance GD control", "balance small-η control"):
        if k not in sums:
            continue
        c = sums[k]["lb"]
        for i, loc in enumerate(c.pairs):
            ctx.predict(f"{k}, {loc}: balance not caused, the orbit never relaxed (R < {R_MIN:g}; "
                        "the ratio is recorded)", sums[k]["relax"][i], R_MIN, 0.0, sense="at_most",
                        why=WHY_CONTROL)
    check_wd(ctx, sums["deep + wd"], early)


def check_wd(ctx: RunContext, wd: dict[str, Any], early: tuple[Any, ...]) -> None:
    """The deep + wd run: per pair the law's premise (its prediction resolved from 0) and the
    stationary law, per neuron the law, and the controls (off wd = 0 balance, first relaxation
    time not stationary)."""
    for d in wd["drift"]:
        ctx.predict(f"wd law premise, deep + wd, {d.location}: prediction resolved from 0, "
                    "|wd(2 − η·wd)·Σ_u ⟨J⟩/η| > 3 SE", abs(float(d.pair_decay)),
                    Z * float(d.pair_drift_se), 0.0, sense="at_least",
                    why="a pair whose weights have decayed away (dead units, no gradient) satisfies the "
                        "law as 0 = 0 whatever the dynamics; the law is tested only where its "
                        "predicted imbalance is resolved from 0 (measured: hidden=16,16,16,16 at "
                        "wd = 0.01 decays to such a network)")
        ctx.predict(f"wd law, deep + wd, {d.location}: Σ_u ⟨e_in − e_out⟩ = wd(2 − η·wd)·Σ_u ⟨J⟩/η",
                    d.pair_imbalance, d.pair_decay, Z * d.pair_drift_se, why=WHY_WD)
        z = unit_z(d.drift, d.drift_se)
        lim = unit_z_limit(len(z), d.n_blocks)
        ctx.predict(f"wd law per neuron, deep + wd, {d.location}: max_u |⟨e_in − e_out⟩ − "
                    "wd(2 − η·wd)⟨J⟩/η| / SE", float(z.max()), 0.0, lim, sense="at_most",
                    why=WHY_WD + f"; per unit, Student-t (n_blocks − 1 dof) Bonferroni limit over "
                        f"{len(z)} units for {FAMILY:.2%} family-wise false failures")
    wlb = wd["lb"]
    for i, loc in enumerate(wlb.pairs):
        ctx.predict(f"wd control, deep + wd, {loc}: off wd = 0 balance, |ratio − 1| > 3 SE",
                    abs(float(wlb.pair_ratio[i]) - 1), Z * float(wlb.pair_ratio_se[i]), 0.0,
                    sense="at_least", why="with wd the stationary imbalance is wd(2 − η·wd)E[J]/η ≠ 0")
    for d in early:
        ctx.predict(f"wd control, deep + wd, first relaxation time {d.window}, {d.location}: "
                    "not yet stationary, |ΔJ/(η²T)| > 3 SE", abs(d.pair_drift), Z * d.pair_drift_se, 0.0,
                    sense="at_least",
                    why="J relaxes at rate ≈ 2η·wd from the off-balance start, so over the first "
                        "1/(η·wd(2 − η·wd)) steps the stationary law must fail")


def wd_scatter(d: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: predicted stationary imbalance (wd term) and the measured mean imbalance."""
    return d.decay, d.imbalance
