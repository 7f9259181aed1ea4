"""The charge of a rescale symmetry in AdamW's geometry, and its exact one-step identity without
momentum (``gpt-balance``).

AdamW (torch, decoupled decay) steps ``θ' = q·θ − η·Λ·m̂`` with ``q = 1 − η·wd``, the diagonal
preconditioner ``Λ = 1/(√v̂ + ε)`` of that step (``v̂`` the bias-corrected second moment after this
step's gradient) and ``m̂`` the bias-corrected first moment. For a rescale symmetry (per unit,
``A = +1`` on the incoming entries, ``−1`` on the outgoing ones) ``A`` is diagonal, so it commutes
with ``Λ``. Take the charge in Λ's metric, ``J_Λ(θ) = θᵀAΛ⁻¹θ = Σ_in θ²/λ − Σ_out θ²/λ``. Then

    J_Λ(θ') = q²·J_Λ(θ) − 2qη·θᵀA·m̂ + η²·m̂ᵀAΛm̂        (algebra, any m̂).

Without momentum (``β₁ = 0``: ``m̂ = g``, the minibatch gradient of the loss) the middle term is
``θᵀA·g = 0`` exactly, the rescale symmetry's Noether identity. So

    J_Λ(θ') = q²·J_Λ(θ) + η²·gᵀAΛg

holds exactly with Λ of the step. That is the condition the experiment checks. The charge itself
is not conserved across steps: the next step measures it in the next Λ, and
``J_{Λ_{t+1}}(θ) − J_{Λ_t}(θ)`` is the change of geometry, not of θ. With momentum (AdamW's default
``β₁ = 0.9``) ``θᵀA·m̂ ≠ 0`` and the identity fails (the control). For the Q/K and V/O double
rotations ``A`` mixes coordinates, so it does not commute with a diagonal Λ, and no such identity
follows.

Round-off bound: as for SGD (:mod:`._gpt_balance_checks`), ``KAPPA·ε`` times the unit's gross in
Λ's metric, ``Σ_in θ²/λ + Σ_out θ²/λ`` before and after the step plus ``η²·Σ λg²``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from neurothermo.experiments import _gpt_balance_checks as ck
from neurothermo.symmetry.base import Symmetry


def adamw_metric(opt: torch.optim.Optimizer, params: Sequence[Tensor] | None = None
                 ) -> dict[Tensor, Tensor]:
    """``√(1/λ) = √(√v̂ + ε)`` per parameter from AdamW's state after its step (torch's formula:
    ``denom = √v / √(1 − β₂^t) + ε``, the update ``−(lr/(1 − β₁^t))·m/denom``), for ``params``
    (default: every parameter of the optimizer).

    Raises:
        ValueError: ``opt`` is not ``torch.optim.AdamW``/``Adam``, or has not stepped yet.
    """
    if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
        raise ValueError(f"adamw_metric needs torch.optim.AdamW, got {type(opt).__name__}")
    wanted = None if params is None else {id(p) for p in params}
    out: dict[Tensor, Tensor] = {}
    for group in opt.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        for p in group["params"]:
            if wanted is not None and id(p) not in wanted:
                continue
            st = opt.state.get(p)
            if not st or "exp_avg_sq" not in st:
                raise ValueError("adamw_metric before the optimizer's first step")
            bc2 = 1.0 - beta2 ** float(st["step"])
            out[p] = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(eps).sqrt_()
    return out


class PreconTrace:
    """Largest residual of ``J_Λ' = q²J_Λ + η²gᵀAΛg`` over its round-off bound, per unit of one
    rescale symmetry, along an AdamW run (streamed: one number kept)."""

    def __init__(self, sym: Symmetry, fam: str, lr: float, wd: float) -> None:
        if sym.kind != "rescale":
            raise ValueError(f"{sym}: the preconditioned identity needs a rescale symmetry "
                             f"(diagonal generator), got {sym.kind}")
        self.sym, self.fam, self.lr = sym, fam, lr
        self.keep = (1.0 - lr * wd) ** 2
        self.names = sorted({s.name for s in sym.slices})
        self.ratio = torch.zeros((), dtype=torch.float64)

    def after(self, before: Mapping[str, Tensor], params: Mapping[str, Tensor],
              grads: Mapping[str, Tensor], metric: Mapping[str, Tensor]) -> None:
        """Step done: ``before`` θ_t, ``params`` θ_{t+1}, ``grads`` g_t, ``metric`` √(1/λ_t)."""
        th0 = {n: before[n] * metric[n] for n in self.names}
        th1 = {n: params[n].detach() * metric[n] for n in self.names}
        gs = {n: grads[n] / metric[n] for n in self.names}
        in0, out0 = ck.role_energy(self.sym, th0, "in"), ck.role_energy(self.sym, th0, "out")
        in1, out1 = ck.role_energy(self.sym, th1, "in"), ck.role_energy(self.sym, th1, "out")
        gin, gout = ck.role_energy(self.sym, gs, "in"), ck.role_energy(self.sym, gs, "out")
        resid = ((in1 - out1) - self.keep * (in0 - out0) - self.lr**2 * (gin - gout)).abs()
        bound = ck.KAPPA * ck.EPS64 * (in0 + out0 + in1 + out1 + self.lr**2 * (gin + gout))
        self.ratio = torch.maximum(self.ratio.to(resid.device), (resid / bound).max())
