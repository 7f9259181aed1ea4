"""Pure functions on tensors behind the monitor: gradient energies, charges, step predictions.

Conventions (docs/theory.md): ``g`` is the gradient of the mean minibatch loss ``l_B`` (what
``loss.backward()`` leaves in ``p.grad``, *without* weight decay); ``lr`` is η; ``weight_decay`` is
torch's ``wd`` (the step uses ``g + wd·θ``). Nothing here synchronises with the device.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor


class Slice(Protocol):
    """What the monitor needs of a symmetry's parameter slice (``neurothermo.symmetry.ParamSlice``).

    The slice reads tensor ``name`` (reshaped to ``view`` if given) with its unit axis ``dim``
    narrowed to ``start:stop``; ``role`` is ``"in"``, ``"out"`` or ``"passive"``.
    """

    name: str
    role: str
    dim: int | None
    start: int
    stop: int | None
    view: tuple[int, ...] | None
    buffer: bool


_FUSED_NORM_NUMEL = 1 << 16  # below this, norms share one _foreach_norm call (slow on big CPU tensors)


def _ordered(keys: Sequence[tuple[str, int, tuple[int, ...] | None]]) -> bool:
    """Whether every key along axis 0 comes after those along other axes."""
    seen_zero = False
    for _, dim, _ in keys:
        if dim == 0:
            seen_zero = True
        elif seen_zero:
            return False
    return True


class SquareSums:
    """Sums of squared entries of named tensors, each reduction computed once and shared.

    ``along(name, dim)`` is ``Σ t²`` over every axis but ``dim`` (a vector along ``dim``);
    ``per_tensor`` gives ``‖t‖²`` per tensor, reusing any ``along`` reduction already made. One
    object per step and per source (gradients, or parameters), so the per-unit energies, the
    charges and the per-layer norms read each tensor about once. The monitor calls :meth:`prepare`
    at the step (the reductions, then the big tensors are let go) and :meth:`stacked` joins
    many steps for the derived columns (``derive.py``).
    """

    def __init__(self, tensors: Mapping[str, Tensor | None],
                 scratch: dict[Any, Tensor] | None = None) -> None:
        self.tensors = tensors
        self._along: dict[tuple[str, int, tuple[int, ...] | None], Tensor] = {}
        self._squares: dict[tuple[str, tuple[int, ...] | None], Tensor] = {}
        self._units: dict[int, tuple[Tensor, Tensor]] = {}
        self._rest: dict[str, Tensor] = {}
        # reused buffers for squared entries: a fresh large allocation each step costs page faults
        self._scratch: dict[Any, Tensor] = {} if scratch is None else scratch

    def prepare(self, keys: Sequence[tuple[str, int, tuple[int, ...] | None]],
                names: Sequence[str]) -> SquareSums:
        """Make every reduction now, then drop the references to the tensors (:meth:`release`).

        ``keys`` are the ``(name, dim, view)`` of :meth:`along`; every tensor of ``names`` that no
        key covers gets its ``‖t‖²`` (one norm kernel each, one fused call for small tensors).
        What is left are the reduced vectors only, safe to keep for later (:meth:`stacked`).
        """
        # axes other than the leading one first: their squared buffer then serves axis 0 too
        for name, dim, view in keys if _ordered(keys) else sorted(keys, key=lambda k: k[1] == 0):
            self.along(name, dim, view)
        covered = {n for n, _, _ in self._along}
        rest = [n for n in names if n not in covered and self.tensors.get(n) is not None]
        small = [n for n in rest if self.tensors[n].numel() < _FUSED_NORM_NUMEL]  # type: ignore[union-attr]
        if small:
            norms = torch._foreach_norm([self.tensors[n].detach() for n in small])  # type: ignore[union-attr]
            self._rest.update(zip(small, norms))
        for n in rest:
            if n not in self._rest:
                self._rest[n] = torch.linalg.vector_norm(self.tensors[n].detach())  # type: ignore[union-attr]
        self.release()
        return self

    def release(self) -> None:
        """Forget the source tensors and squared buffers (keep only the reductions)."""
        self.tensors = {}
        self._squares = {}

    def per_tensor(self, names: Sequence[str]) -> Tensor:
        """``‖t‖²`` of each of ``names`` (along the last axis: one column per name; 0 if missing).

        Uses the reductions made by :meth:`along` (their sum) or :meth:`prepare` (the norm).
        """
        first: dict[str, Tensor] = {}
        for (n, _, _), r in self._along.items():
            first.setdefault(n, r)
        cols: list[Tensor | None] = []
        for n in names:
            if n in first:
                cols.append(first[n].sum(-1))
            elif n in self._rest:
                cols.append(self._rest[n].square())
            else:
                cols.append(None)
        ref = next((c for c in cols if c is not None), None)
        if ref is None:
            raise ValueError("no tensors to take norms of; was backward() called?")
        return torch.stack([ref.new_zeros(ref.shape) if c is None else c.to(ref.dtype) for c in cols], -1)

    @classmethod
    def stacked(cls, steps: Sequence[SquareSums]) -> SquareSums:
        """The reductions of several prepared steps, each stacked along a new first axis.

        A reduction missing at some step (no gradient then) is zero there. :meth:`unit_energies`
        and :meth:`per_tensor` of the result give one row per step.
        """
        out = cls({})
        for attr in ("_along", "_rest"):
            keys = dict.fromkeys(k for s in steps for k in getattr(s, attr))
            for k in keys:
                vals = [getattr(s, attr).get(k) for s in steps]
                ref = next(v for v in vals if v is not None)
                getattr(out, attr)[k] = torch.stack(
                    [ref.new_zeros(ref.shape) if v is None else v for v in vals])
        return out

    def along(self, name: str, dim: int, view: tuple[int, ...] | None = None) -> Tensor | None:
        """``Σ t²`` over every axis of ``name`` (viewed as ``view``) but ``dim``: one entry per unit.

        Memory-bound, so each tensor is read as few times as possible and only along contiguous
        runs: a reduction over the leading axis alone is one fused norm pass (no temporary);
        otherwise the tensor is squared once into a reused buffer, seen as ``[A, n, B]`` (``n``
        units, ``A``/``B`` the axes before/after ``dim``), and reduced first over ``A`` (whole
        contiguous rows added) and then over ``B`` (contiguous runs) — a reduction over
        non-adjacent strided axes at once is several times slower on a CPU.
        """
        key = (name, dim, view)
        if key in self._along:
            return self._along[key]
        t = self.tensors.get(name)
        if t is None:
            return None
        if t.requires_grad and torch.is_grad_enabled():  # (the monitor runs under no_grad)
            t = t.detach()
        v = t if view is None else t.view(view)
        dim = dim % v.ndim
        sq = self._squares.get((name, view))
        n = v.shape[dim]
        if v.numel() == n:  # one entry per unit (a bias, a [1, n] weight): no reduction
            r = (v * v).reshape(n)
        elif sq is None and dim == 0 and v.is_contiguous():  # one pass, no temporary
            r = torch.linalg.vector_norm(v.reshape(n, -1), dim=1).square()
        else:
            if sq is None:
                buf = self._scratch.get((name, view))
                if buf is None or buf.shape != v.shape or buf.dtype != v.dtype or buf.device != v.device:
                    buf = self._scratch[(name, view)] = torch.empty_like(v, memory_format=torch.contiguous_format)
                sq = self._squares[(name, view)] = torch.mul(v, v, out=buf)
            a = math.prod(v.shape[:dim])
            if a == 1:
                rows = sq.reshape(-1)  # [n·B]
            elif sq.device.type == "cpu" and a >= 64:  # adding many rows: a matrix-vector product is faster there
                ones = self._scratch.get(("ones", a, sq.dtype))
                if ones is None:
                    ones = self._scratch[("ones", a, sq.dtype)] = sq.new_ones(a)
                rows = torch.mv(sq.reshape(a, -1).t(), ones)
            else:  # (not on GPUs: a matmul may run in TF32 there)
                rows = sq.reshape(a, -1).sum(0)
            # (never a view of the buffer: the result outlives the step, the buffer does not)
            r = rows.view(n, -1).sum(1) if rows.numel() > n else rows
        self._along[key] = r
        return r

    def unit_energies(self, slices: Sequence[Slice], n_units: int) -> tuple[Tensor, Tensor]:
        """Per unit: squared entries of its ``"in"`` rows and of its ``"out"`` rows, summed.

        Each slice reads a tensor as an ``(n_units, m)`` matrix whose row u is what unit u's
        group element touches. With gradients of a rescale symmetry this is the incoming energy
        ``‖g_{w_u}‖² + g_{b_u}²`` and the outgoing energy ``‖g_{u_u}‖²`` of hidden unit u, whose
        difference is the imbalance ``gᵀAg``; with the parameters, the difference is the charge
        ``J_u``. A missing tensor (``None``: no gradient) counts as zero. On :meth:`stacked`
        sums the units are the last axis (one row per step).
        """
        memo = self._units.get(id(slices))
        if memo is not None:
            return memo
        e_in: Tensor | None = None
        e_out: Tensor | None = None
        for s in slices:
            if s.role == "passive" or s.buffer or s.dim is None:
                continue
            r = self.along(s.name, s.dim, s.view)
            if r is None:
                continue
            q = r if (s.start == 0 and s.stop in (None, r.shape[-1])) else r[..., s.start:s.stop]
            if q.shape[-1] != n_units:
                raise ValueError(f"slice of {s.name!r} has {q.shape[-1]} units, expected {n_units}")
            if s.role == "in":
                e_in = q if e_in is None else e_in + q
            else:
                e_out = q if e_out is None else e_out + q
        ref = e_in if e_in is not None else e_out
        if ref is None:
            raise ValueError(f"none of {[s.name for s in slices]} has a value; was backward() called?")
        out = (ref.new_zeros(ref.shape) if e_in is None else e_in,
               ref.new_zeros(ref.shape) if e_out is None else e_out)
        self._units[id(slices)] = out
        return out


def predicted_change(charge: Tensor, imbalance: Tensor, lr: float, weight_decay: float) -> Tensor:
    """Change of a charge over one plain SGD step, exact for any ``lr`` (docs/theory.md §2).

    ``J' − J = ((1 − lr·wd)² − 1)·J + lr²·gᵀAg`` with ``gᵀAg`` the gradient imbalance (for rescale
    symmetry: incoming minus outgoing gradient energy per unit).
    """
    return ((1.0 - lr * weight_decay) ** 2 - 1.0) * charge + lr**2 * imbalance


def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``Σ_k ‖t_k‖²`` over a list of tensors (one fused norm kernel)."""
    return torch.stack(torch._foreach_norm([t.detach() for t in tensors])).square().sum()


def ema_update(avg: Tensor | None, x: Tensor, beta: float) -> Tensor:
    """Exponential moving average ``m_t = β·m_{t−1} + (1 − β)·x_t`` from ``m_0 = 0`` (``avg=None``).

    ``m_t / (1 − β^t) = Σ_{s≤t} β^{t−s} x_s / Σ_{s≤t} β^{t−s}`` is the bias-corrected running mean.
    """
    if avg is None:
        return x * (1.0 - beta)
    return avg.mul(beta).add_(x, alpha=1.0 - beta)


def balance_residual(a: Tensor, b: Tensor, sum_a: Tensor | None = None,
                     sum_b: Tensor | None = None) -> Tensor:
    """``Σ|a − b| / Σ(a + b)`` over the last axis, for non-negative energies: 0 at balance, 1 when
    one side is zero. ``sum_a`` / ``sum_b`` may pass ``Σa`` / ``Σb`` when they are already computed.
    """
    sa = a.sum(-1) if sum_a is None else sum_a
    sb = b.sum(-1) if sum_b is None else sum_b
    return (a - b).abs().sum(-1) / (sa + sb)


def batch_noise_terms(
    sample_sq_norms: Tensor, grad_sq: Tensor, *, lr: float, dataset_size: int | None,
    replacement: bool, grad_sq_decayed: Tensor | None = None,
) -> dict[str, Tensor]:
    """Entropic discretization and noise terms estimated from one minibatch (docs/theory.md §1).

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
