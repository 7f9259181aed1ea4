"""Pure functions on tensors behind the monitor: gradient energies, charges, step predictions.

Conventions (THEORY.md): ``g`` is the gradient of the mean minibatch loss ``l_B`` (what
``loss.backward()`` leaves in ``p.grad``, *without* weight decay); ``lr`` is η; ``weight_decay`` is
torch's ``wd`` (the step uses ``g + wd·θ``). Nothing here synchronises with the device.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor


class Slice(Protocol):
    """What the monitor needs of a symmetry's parameter slice (``neurothermo.symmetry.ParamSlice``)."""

    name: str
    role: str  # "in", "out" or "passive"

    def matrix(self, t: Tensor, n_units: int) -> Tensor: ...


def unit_energies(
    slices: Sequence[Slice], tensors: Mapping[str, Tensor | None], n_units: int
) -> tuple[Tensor, Tensor]:
    """Per unit: the squared entries of its ``"in"`` rows and of its ``"out"`` rows, summed.

    Each slice reads a tensor as an ``(n_units, m)`` matrix whose row u is what unit u's group
    element touches. For a rescale symmetry and gradients this gives the incoming energy
    ``‖g_{w_u}‖² + g_{b_u}²`` and the outgoing energy ``‖g_{u_u}‖²`` of hidden unit u; their
    difference is the imbalance ``gᵀAg`` (with parameters instead of gradients: the charge
    ``J_u``). A missing tensor (``None``: the parameter got no gradient) counts as zero.
    """
    e_in: Tensor | None = None
    e_out: Tensor | None = None
    ref: Tensor | None = None
    for s in slices:
        t = tensors.get(s.name)
        if s.role == "passive" or t is None:
            continue
        ref = t
        q = s.matrix(t.detach(), n_units).square().sum(dim=1)
        if s.role == "in":
            e_in = q if e_in is None else e_in + q
        else:
            e_out = q if e_out is None else e_out + q
    if ref is None:
        raise ValueError(f"none of {[s.name for s in slices]} has a value; was backward() called?")
    zero = ref.new_zeros(n_units)
    return (zero if e_in is None else e_in), (zero if e_out is None else e_out)


def predicted_change(charge: Tensor, imbalance: Tensor, lr: float, weight_decay: float) -> Tensor:
    """Change of a charge over one plain SGD step, exact for any ``lr`` (THEORY.md §2).

    ``J' − J = ((1 − lr·wd)² − 1)·J + lr²·gᵀAg`` with ``gᵀAg`` the gradient imbalance (for rescale
    symmetry: incoming minus outgoing gradient energy per unit).
    """
    return ((1.0 - lr * weight_decay) ** 2 - 1.0) * charge + lr**2 * imbalance


def squared_norms(tensors: Sequence[Tensor | None]) -> Tensor:
    """``[‖t_0‖², ‖t_1‖², …]`` as one tensor; ``None`` entries give 0 (one fused kernel per dtype)."""
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("no tensors to take norms of")
    norms = torch._foreach_norm(present)  # the fused kernel clip_grad_norm_ uses
    sq = torch.stack([n.to(present[0].dtype) for n in norms]).square()
    if len(present) == len(tensors):
        return sq
    out = sq.new_zeros(len(tensors))
    out[[i for i, t in enumerate(tensors) if t is not None]] = sq
    return out


def segment_sum(values: Tensor, index: Tensor, n: int) -> Tensor:
    """Sum ``values[i]`` into ``n`` segments: ``out[k] = Σ_{i: index[i]=k} values[i]``."""
    return values.new_zeros(n).index_add_(0, index, values)


def ema_update(avg: Tensor | None, x: Tensor, beta: float) -> Tensor:
    """Exponential moving average ``m_t = β·m_{t−1} + (1 − β)·x_t`` from ``m_0 = 0`` (``avg=None``).

    ``m_t / (1 − β^t) = Σ_{s≤t} β^{t−s} x_s / Σ_{s≤t} β^{t−s}`` is the bias-corrected running mean.
    """
    if avg is None:
        return x * (1.0 - beta)
    return avg.mul(beta).add_(x, alpha=1.0 - beta)


def balance_residual(a: Tensor, b: Tensor) -> Tensor:
    """``Σ|a − b| / Σ(a + b)`` for non-negative energies: 0 at balance, 1 when one side is zero."""
    return (a - b).abs().sum() / (a + b).sum()


def batch_noise_terms(
    sample_sq_norms: Tensor, grad_sq: Tensor, *, lr: float, dataset_size: int | None,
    replacement: bool, grad_sq_decayed: Tensor | None = None,
) -> dict[str, Tensor]:
    """Entropic discretization and noise terms estimated from one minibatch (THEORY.md §1).

    ``sample_sq_norms = [‖g_i‖²]`` for the b per-sample loss gradients, ``grad_sq = ‖g_B‖²`` for their
    mean (the minibatch gradient), ``grad_sq_decayed = ‖g_B + wd·θ‖²`` when there is weight decay
    (it enters the discretization term, not the noise). Unbiased estimates:

    * ``trace_sigma = b/(b−1)·[(1/b)Σ‖g_i‖² − ‖g_B‖²]``, times ``(N−1)/N`` when the batch was drawn
      without replacement from N samples (population convention ``Tr Σ = (1/N)Σ‖g_i‖² − ‖ḡ‖²``);
    * ``Tr Σ_B = Tr Σ / b`` with replacement (or N unknown), ``Tr Σ·(N − b)/(b(N − 1))`` without;
    * ``discretization = (lr/4)·(‖g_B + wd·θ‖² − Tr Σ_B)`` since ``E‖g_B‖² = ‖∇L‖² + Tr Σ_B``;
      ``noise = (lr/4)·Tr Σ_B``.
    """
    b = sample_sq_norms.shape[0]
    if b < 2:
        raise ValueError("estimating Tr Σ from one minibatch needs b >= 2 samples")
    n = dataset_size
    tr = (b / (b - 1)) * (sample_sq_norms.mean() - grad_sq)
    if not replacement and n is not None:
        tr = tr * ((n - 1) / n)
    tr_b = tr / b if (replacement or n is None) else tr * ((n - b) / (b * (n - 1)))
    total_sq = grad_sq if grad_sq_decayed is None else grad_sq_decayed
    return {"trace_sigma": tr, "discretization": (lr / 4) * (total_sq - tr_b),
            "noise": (lr / 4) * tr_b}
