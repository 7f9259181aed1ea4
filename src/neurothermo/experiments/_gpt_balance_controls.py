"""The controls of ``gpt-balance`` on their runs: the gradient-flow control (η × small_lr_factor),
the broken symmetry (no decay on W_K) and AdamW's geometry (the rescale charges' identity without
momentum, failing with it), plus the law on the first relaxation time (recorded).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from neurothermo.experiments import _gpt_balance_checks as ck
from neurothermo.experiments import _gpt_balance_train as tr
from neurothermo.experiments._gpt_balance_laws import (
    KEPT_MAX,
    RunResult,
    identity_by_family,
    laws,
    moved_fraction,
    precon_by_family,
)
from neurothermo.experiments.base import RunContext

if TYPE_CHECKING:
    from neurothermo.experiments.gpt_balance import GptBalanceConfig


def small_lr_checks(ctx: RunContext, cfg: GptBalanceConfig, small: RunResult, start: int
                    ) -> dict[str, object]:
    """The gradient-flow control: charges kept (``moved_fraction`` ≤ KEPT_MAX); the law must fail.

    Also recorded: ``|J_T − q^T·J_0| / (η²Σ|gᵀAg| + round-off)``, the identity's η² term, which
    cannot exceed 1 while the identity holds and so is not a check of its own.
    """
    out: dict[str, object] = {}
    # small η: identity still exact, charges within the η² term of their (decayed) start
    eta, wd, n = small.spec.lr, small.spec.wd, small.spec.steps
    worst = 0.0
    for t in small.traces:
        j0, jt = t.j0.cpu().numpy(), t.j.cpu().numpy()
        gterm = eta**2 * t.sum_abs_gag.cpu().numpy()
        gmax = t.gross_max.double().cpu().numpy()
        bound = gterm + ck.KAPPA * ck.EPS64 * n * (gmax.reshape(
            (-1,) + (1,) * (j0.ndim - 1)) if j0.ndim > 1 else gmax)
        worst = max(worst, float((np.abs(jt - (1 - eta * wd) ** (2 * n) * j0) / bound).max()))
    # by the identity this ratio is ≤ 1 whatever the noise did: recorded, not a check
    moved = moved_fraction(small)
    ctx.predict("small-η control: charges kept, largest Σ‖J_T − (1−η·wd)^{2T}J_0‖ / "
                "Σ‖(1−η·wd)^{2T}J_0‖ over the families", max(moved.values()), KEPT_MAX, 0.0,
                sense="at_most", control=True,
                why="gradient flow conserves J up to the decay: the noise adds η²Σ q^{T−1−t}gᵀAg, "
                "O(η²T), small against the start (at the full η it replaces the start)")
    fl = laws(small)
    lim = ck.z_limit(cfg.n_blocks, len(fl), cfg.alpha)
    zs = {f: rows[0].z for f, rows in fl.items()}
    zmax = max(zs[f] for f in ("vo", "mlp", "ln") if f in zs)
    ctx.predict("small-η control: the weight-decay law fails (largest |z| of the families that "
                "start off balance: V/O, MLP, LayerNorm)", zmax, lim, 0.0, sense="at_least",
                control=True, why="at small η the charges relax only over τ ∝ 1/η, so the gradient "
                "energies keep the imbalance of the init (per-family z in the summary)")
    out["small_lr"] = {"z": zs, "rel": {f: rows[0].rel for f, rows in fl.items()},
                       "charge_kept_ratio": worst, "moved": moved}
    return out


def adamw_checks(ctx: RunContext, adamw: RunResult, plain: RunResult) -> dict[str, object]:
    """AdamW's geometry: the rescale charges' exact identity without momentum, failing with it."""
    ok, mom = precon_by_family(plain), precon_by_family(adamw)
    for fam, r in ok.items():
        ctx.predict(f"AdamW, β1 = 0: J_Λ' = (1−η·wd)²J_Λ + η²gᵀAΛg in Λ = 1/(√v̂+ε), "
                    f"{tr.FAMILY_LABEL[fam]} (residual / round-off bound)", r, 1.0, 0.0,
                    sense="at_most",
                    why="a rescale generator is diagonal, so it commutes with Adam's diagonal Λ; "
                        "without momentum the cross term is θᵀAg = 0, the symmetry's own "
                        "identity (docs: AdamW)")
    ctx.predict("AdamW with momentum (β1 = 0.9, the measured run): the same identity fails "
                "(smallest residual / bound over the rescale families)", min(mom.values()), 1.0,
                0.0, sense="at_least", control=True,
                why="with momentum the step follows m̂, not g, and θᵀA·m̂ ≠ 0")
    return {"precon_identity_beta1_0": ok, "precon_identity_momentum": mom,
            "final_loss_beta1_0": plain.late_loss}


def first_tau_z(cfg: GptBalanceConfig, main: RunResult) -> dict[str, float]:
    """|z| of the law on the first relaxation time of the main run (recorded, not a control: its
    block SEs are dominated by the first steps' large imbalances, so it rarely reaches the limit)."""
    fl = laws(main, "first")
    return {f: rows[0].z for f, rows in fl.items()}


def broken_checks(ctx: RunContext, cfg: GptBalanceConfig, broken: RunResult, start: int
                  ) -> dict[str, object]:
    """The broken control (no weight decay on W_K): the Q/K identity and law must fail."""
    out: dict[str, object] = {}
    ident = identity_by_family(broken)
    ctx.predict("broken control (no decay on W_K): Q/K identity residual / round-off bound",
                ident["qk"], 1.0, 0.0, sense="at_least", control=True,
                why="decay on W_Q alone adds η·wd(2−η·wd)‖W_K‖²-size terms the identity lacks")
    touched, clean = 0.0, 0.0
    for t in broken.traces:
        r = float(t.ident)
        if overlaps(t.sym, broken.spec.unshield):
            touched = max(touched, r) if t.fam != "qk" else touched
        else:
            clean = max(clean, r)
    ctx.predict("broken control: the identity of every orbit that avoids W_K still holds",
                clean, 1.0, 0.0, sense="at_most", control=True,
                why="the breaking touches only orbits that contain K columns of c_attn")
    out["broken_ln1_identity_ratio"] = touched  # ln_1 → c_attn rows contain the K columns too
    fl = laws(broken)
    lim = ck.z_limit(cfg.n_blocks, len(fl), cfg.alpha)
    zqk = fl["qk"][0].z
    ctx.predict("broken control: the Q/K weight-decay law fails, |z|", zqk, lim, 0.0,
                sense="at_least", control=True,
                why="W_K is not decayed, so J_QK is not pulled to the law's stationary point")
    out["broken"] = {"identity_ratio": ident, "z_qk": zqk}
    return out


def overlaps(sym: object, unshield: tuple[tuple[str, int, int, int], ...]) -> bool:
    """Whether any slice of ``sym`` touches an undecayed ``(name, dim, start, stop)`` region."""
    for s in sym.slices:  # type: ignore[attr-defined]
        for name, dim, a, b in unshield:
            if s.name != name:
                continue
            if s.dim != dim or s.view is not None:
                return True
            stop = b if s.stop is None else s.stop
            if s.start < b and a < stop:
                return True
    return False
