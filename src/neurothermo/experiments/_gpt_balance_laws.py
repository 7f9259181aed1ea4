"""Laws of ``gpt-balance`` on a streamed run: the identity per family, the weight-decay law per
group and per family (with the premise: the decay exponent κ of each group's weights, see
:func:`._gpt_balance_checks.decay_exponent`), and the sampled series of the figures.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from neurothermo.experiments import _gpt_balance_checks as ck
from neurothermo.experiments import _gpt_balance_train as tr
from neurothermo.experiments._gpt_balance_precon import PreconTrace


@dataclass(frozen=True)
class RunResult:
    spec: tr.RunSpec
    traces: list[tr.Trace]
    late_loss: float
    windows: dict[str, tr.Window]
    precon: tuple[PreconTrace, ...] = ()


def _worst_by_family(pairs: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam, ratio in pairs:
        out[fam] = max(out.get(fam, 0.0), float(ratio))
    return out


def identity_by_family(res: RunResult) -> dict[str, float]:
    """Largest residual / round-off bound of the SGD identity per family."""
    return _worst_by_family((t.fam, t.ident) for t in res.traces)


def precon_by_family(res: RunResult) -> dict[str, float]:
    """Largest residual / round-off bound of the preconditioned identity per rescale family."""
    return _worst_by_family((t.fam, t.ratio) for t in res.precon)


def _group_sums(t: tr.Trace, window: str) -> dict[str, np.ndarray]:
    """The window sums of a trace per group: per head (rotations) or summed over the units."""
    s = t.sums[window].numpy()
    if t.fam in ("qk", "vo"):
        return s
    return {k: v.sum(-1, keepdims=True) for k, v in s.items()}


@dataclass(frozen=True)
class GroupLaw:
    """The law on one group (a head, a layer's units) or on a family's sum of groups, with its
    premise: the decay exponent ``kappa`` of the group's gross over the window (0: stationary,
    1: shrinking at the weight-decay rate, not trained; see :func:`ck.decay_exponent`)."""

    label: str
    law: ck.WdLaw
    kappa: float
    gross_z: float = 0.0
    gross_growth: float = 0.0
    z_half: float = 0.0

    @property
    def resolution(self) -> float:
        """``|c⟨N⟩| / (2·SE)`` (smallest entry): a factor-2 error in the law's constant (wd read
        as γ = wd/2) in units of the check's SE. Recorded with ``z_half``, the check itself at
        ``c/2`` (whose SE is larger: halving c undoes the cancellation of N's fluctuations
        between ``gᵀAg`` and ``c·N``), so a large resolution alone does not mean c/2 fails."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.abs(self.law.cj) / (2.0 * self.law.se)
        return float(np.nan_to_num(r, nan=0.0, posinf=np.inf).min())

    def stationary(self, z_max: float) -> bool:
        """The law's premise: trained (``κ < KAPPA_MAX``) and no drift of the gross detected
        across the window's blocks (``|gross_z| ≤ z_max``; see :func:`ck.trend`)."""
        return self.kappa < KAPPA_MAX and abs(self.gross_z) <= z_max

    @property
    def z(self) -> float:
        return float(np.abs(self.law.z).max())

    @property
    def rel(self) -> float:
        """The law's relative residual ``|⟨gᵀAg − c·N⟩| / |c·⟨N⟩|`` (largest entry; ``inf`` where
        ``⟨N⟩ = 0``). By the identity it equals ``(ΔN/|⟨N⟩|)·(τ/n)``: the window's drift of N in
        units of its mean, times the relaxation time over the window length. Recorded, not
        predicted: it reads as "the law holds to this fraction" only where ``|⟨N⟩|`` is well
        away from 0 (full preset, seeds 0–2: 0.1–24 %); where ``⟨N⟩ ≈ 0`` it is large whatever the drift
        (quick preset: up to 3), so the checks use ``z``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.abs(self.law.resid) / np.abs(self.law.cj)
        return float(np.nan_to_num(r, nan=0.0, posinf=np.inf).max())


KEYS = ("blocks", "gag", "cn", "n_start", "n_end", "gross_start", "gross_end", "gross_blocks",
        "n_blocks")
KAPPA_MAX = 0.5  # the premise: nearer the stationary regime (κ = 0) than the untrained one (κ = 1)


def _law(label: str, s: dict[str, np.ndarray], sizes: np.ndarray, spec: tr.RunSpec
         ) -> GroupLaw:
    law = ck.law_from_blocks(s["blocks"], sizes, s["gag"], s["cn"], s["n_start"], s["n_end"],
                             spec.lr)
    kappa = ck.decay_exponent(s["gross_start"], s["gross_end"], spec.lr, spec.wd,
                              int(sizes.sum()))
    gz, growth = ck.trend(s["gross_blocks"], sizes)
    c = ck.law_constant(spec.lr, spec.wd)
    # the power check: the same blocks with the law's constant halved (wd read as γ = wd/2)
    half = ck.law_from_blocks(s["blocks"] + 0.5 * c * s["n_blocks"], sizes, s["gag"],
                              0.5 * s["cn"], s["n_start"], s["n_end"], spec.lr)
    return GroupLaw(label, law, float(np.max(kappa)), float(gz[0]), float(growth[0]),
                    float(np.abs(half.z).max()))


def laws(res: RunResult, window: str = "law", premise: Callable[[GroupLaw], bool] | None = None
         ) -> dict[str, list[GroupLaw]]:
    """Per family: the law per group, preceded by the family's sum over its groups.

    With ``premise`` the sum runs over the groups for which it is true only; a family with none
    gets no sum row.
    """
    sizes = np.asarray(res.windows[window].sizes(), dtype=np.float64)
    fams: dict[str, list[GroupLaw]] = {}
    sums: dict[str, dict[str, np.ndarray]] = {}
    for t in res.traces:
        s = _group_sums(t, window)
        for i in range(s["gag"].shape[-1]):
            label = f"layer {t.layer} head {i}" if t.fam in ("qk", "vo") else f"{t.sym.location}"
            gl = _law(label, {k: s[k][..., i:i + 1] for k in KEYS}, sizes, res.spec)
            fams.setdefault(t.fam, []).append(gl)
            if premise is not None and not premise(gl):
                continue
            acc = sums.setdefault(t.fam, {k: 0.0 * s[k][..., i:i + 1] for k in KEYS})
            for k in KEYS:
                acc[k] = acc[k] + s[k][..., i:i + 1]
    for f in fams:
        if f in sums:
            fams[f].insert(0, _law(f"{f} (sum)", sums[f], sizes, res.spec))
    return fams


KEPT_MAX = 0.5  # "kept": the decayed start outweighs what the noise added (the κ threshold's logic)


def moved_fraction(res: RunResult) -> dict[str, float]:
    """Per family, how far the charges moved beyond the weight decay of their start, relative to it.

    ``M = Σ‖J_T − q^T·J_0‖ / Σ‖q^T·J_0‖`` with ``q = (1 − η·wd)²`` and T the run's steps, the sums
    over the family's heads (Frobenius norm of each head's matrix charge) or units (absolute
    value). By the identity the numerator is ``‖N_T‖``, what the minibatch noise added
    (``η²·Σ_t q^{T−1−t}·gᵀAg_t``). Gradient flow conserves J up to the decay, so it predicts
    ``M ≪ 1``; ``M ≤ KEPT_MAX`` says the decayed start outweighs the noise. Under SGD at the full η
    the noise replaces the start within a few τ, so M grows without bound: the same measure fails
    there. This is not implied by the identity, which bounds ``‖N_T‖`` by ``η²Σ|gᵀAg|`` whatever
    ``J_0``; M compares the noise with the charge's own size.
    """
    q = (1.0 - res.spec.lr * res.spec.wd) ** (2 * res.spec.steps)
    moved: dict[str, float] = {}
    kept: dict[str, float] = {}
    for t in res.traces:
        moved[t.fam] = moved.get(t.fam, 0.0) + float(tr.charge_size(t.j - q * t.j0))
        kept[t.fam] = kept.get(t.fam, 0.0) + float(tr.charge_size(q * t.j0))
    return {f: moved[f] / kept[f] if kept[f] > 0 else float("inf") for f in moved}


def family_series(res: RunResult, fam: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(sampled steps, Σ over the family's groups of ``Σ|J|`` (``what="size"``) or gross)."""
    total: np.ndarray | None = None
    steps = np.zeros(0)
    for t in res.traces:
        if t.fam != fam:
            continue
        steps, size, gross = t.series_numpy()
        v = size if what == "size" else gross
        total = v if total is None else total + v
    if total is None:
        raise KeyError(fam)
    return steps, total
