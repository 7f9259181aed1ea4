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
# On a CPU a tensor read along several axes is squared a block of leading-axis rows at a time into a
# buffer of about this many entries (1 MiB in float32: it stays in a core's L2 cache while it is
# reduced, instead of a full-size squared copy written to memory and read back once per axis).
_CHUNK_NUMEL = 1 << 18


class SquareSums:
    """Sums of squared entries of named tensors, each reduction computed once and shared.

    ``along(name, dim)`` is ``Σ t²`` over every axis but ``dim`` (a vector along ``dim``);
    ``per_tensor`` gives ``‖t‖²`` per tensor, reusing any ``along`` reduction already made. One
    object per step and per source (gradients, or parameters), so the per-unit energies, the
    charges and the per-layer norms read each tensor once. The monitor calls :meth:`prepare`
    at the step (the reductions, then the big tensors are let go) and :meth:`stacked` joins
    many steps for the derived columns (``derive.py``).
    """

    def __init__(self, tensors: Mapping[str, Tensor | None],
                 scratch: dict[Any, Tensor] | None = None) -> None:
        self.tensors = tensors
        self._along: dict[tuple[str, int, tuple[int, ...] | None], Tensor] = {}
        self._units: dict[int, tuple[Tensor, Tensor]] = {}
        self._rest: dict[str, Tensor] = {}
        # reused buffers for squared entries: a fresh large allocation each step costs page faults
        self._scratch: dict[Any, Tensor] = {} if scratch is None else scratch

    def prepare(self, keys: Sequence[tuple[str, int, tuple[int, ...] | None]],
                names: Sequence[str]) -> SquareSums:
        """Make every reduction now, then drop the references to the tensors (:meth:`release`).

        ``keys`` are the ``(name, dim, view)`` of :meth:`along`; all the axes asked of one tensor
        come from one read of it (:meth:`_reduce`); every tensor of ``names`` that no key covers
        gets its ``‖t‖²`` (one norm kernel each, one fused call for small tensors). What is left
        are the reduced vectors only, safe to keep for later (:meth:`stacked`).
        """
        groups: dict[tuple[str, tuple[int, ...] | None], list[int]] = {}
        for name, dim, view in keys:
            groups.setdefault((name, view), []).append(dim)
        vectors: list[tuple[str, tuple[int, ...] | None, int]] = []  # one entry per unit: squared as is
        for (name, view), dims in groups.items():
            t = self.tensors.get(name)
            if t is not None and all(t.numel() == (t.shape if view is None else view)[d] for d in dims):
                vectors.extend((name, view, d) for d in dims)
            else:
                self._reduce(name, view, dims)
        if vectors:  # (a bias, a norm layer's weight: one fused kernel for all of them)
            flat = [self.tensors[n].detach().reshape(-1) for n, _, _ in vectors]  # type: ignore[union-attr]
            for (name, view, d), sq in zip(vectors, torch._foreach_mul(flat, flat)):
                self._along[(name, d, view)] = sq
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
        """Forget the source tensors (keep only the reductions)."""
        self.tensors = {}

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

        Made by :meth:`prepare` (with every other axis asked of the same tensor, in one read),
        else now; ``None`` when the tensor is missing.
        """
        key = (name, dim, view)
        if key not in self._along:
            self._reduce(name, view, [dim])
        return self._along.get(key)

    def _reduce(self, name: str, view: tuple[int, ...] | None, dims: Sequence[int]) -> None:
        """``Σ t²`` of tensor ``name`` along each axis of ``dims``, from a single read of it.

        Memory-bound, so the tensor is read once and only along contiguous runs: a reduction
        over the leading axis alone is one fused norm pass (no temporary); otherwise blocks of
        leading-axis rows are squared into a reused buffer (on a CPU one of about
        ``_CHUNK_NUMEL`` entries, which stays in cache; elsewhere the whole tensor at once) and
        each block, seen as ``[A, n, B]`` for axis ``dim`` (``n`` units, ``A``/``B`` the axes
        before/after it), is reduced over ``A`` (whole contiguous rows added, by a
        matrix-vector product on a CPU) into a running ``[n·B]`` sum, reduced over ``B`` at the
        end; axis 0 takes each block's row sums. A reduction over non-adjacent strided axes at
        once is several times slower on a CPU, and so is a strided norm.
        """
        t = self.tensors.get(name)
        if t is None:
            return
        if t.requires_grad and torch.is_grad_enabled():  # (the monitor runs under no_grad)
            t = t.detach()
        v = t if view is None else t.view(view)
        asked = [d for d in dims if (name, d, view) not in self._along]  # (as the caller numbers them)
        if not asked:
            return
        res: dict[int, Tensor] = {}
        self._reduce_axes(v, name, view, sorted({d % v.ndim for d in asked}), res)
        for d in asked:
            self._along[(name, d, view)] = res[d % v.ndim]

    def _reduce_axes(self, v: Tensor, name: str, view: tuple[int, ...] | None, todo: list[int],
                     res: dict[int, Tensor]) -> None:
        """:meth:`_reduce` along the (non-negative, sorted) axes ``todo`` of ``v``, into ``res``.

        The blocks, the views of the reused buffer they are squared into and the ``ones`` of the
        matrix-vector products are laid out once per tensor shape (:class:`_BlockPlan`, kept with
        the scratch buffers), so a step issues only the kernels (bit for bit the same ones)."""
        for d in todo:
            if v.numel() == v.shape[d]:  # one entry per unit (a bias, a [1, n] weight): no reduction
                res[d] = (v * v).reshape(-1)
        todo = [d for d in todo if d not in res]
        if not todo:
            return
        rows = v.shape[0]
        if todo == [0] and v.is_contiguous():  # one pass, no temporary
            res[0] = torch.linalg.vector_norm(v.reshape(rows, -1), dim=1).square()
            return
        key = ("plan", name, view)
        plan = self._scratch.get(key)
        if not (isinstance(plan, _BlockPlan) and plan.fits(v, todo)):
            plan = self._scratch[key] = _BlockPlan(v, todo)  # type: ignore[assignment]
        assert isinstance(plan, _BlockPlan)
        lead = v.new_empty(rows) if plan.lead else None
        leads = lead.split(plan.block) if lead is not None else ()
        acc: list[Tensor | None] = [None] * len(plan.axes)
        for i, blk in enumerate(v.split(plan.block)):
            torch.mul(blk, blk, out=plan.bufs[i])
            if lead is not None:
                torch.sum(plan.flat[i], 1, out=leads[i])
            for j, (_, per_block) in enumerate(plan.axes):
                m, ones = per_block[i]
                a = acc[j]
                if ones is not None:  # adding many rows: a matrix-vector product (m is transposed)
                    acc[j] = torch.mv(m, ones) if a is None else a.addmv_(m, ones)
                else:  # (not on GPUs: a matmul may run in TF32 there)
                    part = m.sum(0)
                    acc[j] = part if a is None else a.add_(part)
        if lead is not None:
            res[0] = lead
        for (d, _), r in zip(plan.axes, acc):  # (never a view of the buffer: the result outlives the step)
            assert r is not None
            n = v.shape[d]
            res[d] = r.view(n, -1).sum(1) if r.numel() > n else r

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


class _BlockPlan:
    """How :meth:`SquareSums._reduce_axes` reads one tensor shape: blocks of ``block`` leading-axis
    rows (on a CPU about ``_CHUNK_NUMEL`` entries, elsewhere all rows), the view of the reused
    buffer each block is squared into (``bufs``, and as ``[rows, rest]`` in ``flat`` for the
    leading-axis sums) and, per other axis ``d``, each block as ``[A, n·B]`` (``A`` the entries
    before axis ``d``): transposed with a vector of ones for a matrix-vector product, or as is
    (``ones`` None) for a column sum. Made once per shape and kept with the scratch buffers."""

    def __init__(self, v: Tensor, todo: list[int]) -> None:
        self.shape, self.dtype, self.device, self.todo = v.shape, v.dtype, v.device, list(todo)
        rows = v.shape[0]
        cpu = v.device.type == "cpu"
        block = max(1, _CHUNK_NUMEL // max(1, v[0].numel())) if cpu else rows
        self.block = block = min(block, rows)
        buf = v.new_empty((block, *v.shape[1:]))
        sizes = [min(block, rows - s) for s in range(0, rows, block)]
        self.bufs = [buf[:n] for n in sizes]
        self.flat = [b.view(n, -1) for b, n in zip(self.bufs, sizes)]
        self.lead = 0 in todo
        ones: dict[int, Tensor] = {}
        self.axes: list[tuple[int, list[tuple[Tensor, Tensor | None]]]] = []
        for d in todo:
            if d == 0:
                continue
            per_block: list[tuple[Tensor, Tensor | None]] = []
            for b, n in zip(self.bufs, sizes):
                a = n * math.prod(v.shape[1:d])
                m = b.view(a, -1)
                if cpu and a >= 64:
                    if a not in ones:
                        ones[a] = v.new_ones(a)
                    per_block.append((m.t(), ones[a]))
                else:
                    per_block.append((m, None))
            self.axes.append((d, per_block))

    def fits(self, v: Tensor, todo: list[int]) -> bool:
        """Whether this plan was made for ``v``'s shape, dtype and device and the axes ``todo``."""
        return (v.shape == self.shape and v.dtype == self.dtype and v.device == self.device
                and todo == self.todo)


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
