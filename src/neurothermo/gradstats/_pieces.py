"""Exact per-sample gradient *pieces* and their squared norms (the functional core).

A layer rule never materialises per-sample gradients when it can avoid it. For one recorded use of
a parameter it hands back the contribution of that use to every sample's gradient, in one of three
exact forms (``c_i`` below is that contribution for sample ``i``; see ``norms.py`` for the factor b):

* :class:`Factored` ``(U, V)``: ``c_i = Σ_t U[i,g,t] ⊗ V[i,g,t]`` for each group ``g`` (Linear: U the
  output gradients, V the inputs, t the positions; Conv: t the unfolded patches). Its squared norm is
  ``Σ_g Σ_{t,s} (U_t·U_s)(V_t·V_s)`` (Gram form, ``T²(m+n)`` flops per sample and group) or
  ``‖Σ_t U_t V_tᵀ‖²`` (dense form, ``T·m·n``); the cheaper one is used. ``T = 1`` gives ``‖U‖²‖V‖²``.
* :class:`Indexed` ``(idx, V)``: ``c_i = Σ_t e_{idx[i,t]} ⊗ V[i,t]`` (Embedding): rows looked up
  several times by one sample are summed before squaring.
* :class:`Dense` ``(G)``: ``c_i = G[i]`` (biases, norm affines, the torch.func fallback).

Several pieces for one parameter (a module called twice, tied weights, the q/k/v row blocks of a
packed attention projection) are combined exactly: per-sample gradients ADD before squaring. Pieces
on disjoint row blocks add their squared norms; pieces of one kind on the same rows are concatenated
(positions of a Factored/Indexed piece); an Indexed and a Factored piece on the same rows (tied
input/output embeddings) add ``2⟨c_A, c_B⟩`` computed from their factors; anything else is
materialised to ``[b, numel]`` and summed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

import torch
from torch import Tensor

# Largest temporary (elements) one chunk of the batch may allocate in a norm computation.
_CHUNK_ELEMENTS = 1 << 24


def chunked(fn: Callable[..., Tensor], tensors: tuple[Tensor, ...], per_sample: int,
            b: int) -> Tensor:
    """Apply ``fn`` to slices of the batch so that no temporary exceeds ``_CHUNK_ELEMENTS``."""
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    if step >= b:
        return fn(*tensors)
    return torch.cat([fn(*(x[i:i + step] for x in tensors)) for i in range(0, b, step)])


@dataclass(frozen=True)
class Factored:
    """``c_i = Σ_t U[i,g,t] ⊗ V[i,g,t]``; ``U``: ``[b, G, T, m]``, ``V``: ``[b, G, T, n]``.

    The block it describes has ``G·m`` rows of ``n`` entries (row-major), e.g. a Linear weight
    ``[out, in]`` (G = 1) or a Conv weight ``[out, in/G·k…]``. ``v_layout = (shape, perm)`` says
    that V's ``n`` columns are laid out as ``shape`` and reach the parameter's order by ``perm``
    (only materialising needs it: a norm does not depend on the order).
    """

    U: Tensor
    V: Tensor
    v_layout: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def sq_norm(self, method: str | None = None) -> Tensor:
        return factored_sq_norm(self.U, self.V, method)

    def materialize(self) -> Tensor:
        b, g, _, m = self.U.shape
        layout = self.v_layout

        def block(u: Tensor, v: Tensor) -> Tensor:
            M = u.mT @ v  # [b, G, m, n]
            if layout is not None:
                shape, perm = layout
                M = M.reshape(*M.shape[:3], *shape).permute(0, 1, 2, *(3 + p for p in perm))
            return M.reshape(M.shape[0], -1)

        return chunked(block, (self.U, self.V), g * m * self.V.shape[3], b)


@dataclass(frozen=True)
class Indexed:
    """``c_i = Σ_t e_{idx[i,t]} ⊗ V[i,t]``; ``idx``: ``[b, T]`` (int), ``V``: ``[b, T, n]``."""

    idx: Tensor
    V: Tensor
    num_rows: int

    def sq_norm(self) -> Tensor:
        b, t = self.idx.shape
        n = self.V.shape[-1]
        # One key per (sample, row): rows repeated within a sample are summed before squaring.
        key = self.idx + torch.arange(b, device=self.idx.device).unsqueeze(1) * self.num_rows
        uniq, inv = torch.unique(key.reshape(-1), return_inverse=True)
        summed = self.V.new_zeros(uniq.shape[0], n).index_add(0, inv, self.V.reshape(b * t, n))
        return self.V.new_zeros(b).index_add(0, uniq // self.num_rows, summed.square().sum(1))

    def materialize(self) -> Tensor:
        b, t = self.idx.shape
        n = self.V.shape[-1]
        rows = torch.arange(b, device=self.idx.device).unsqueeze(1).expand(b, t)
        out = self.V.new_zeros(b, self.num_rows, n)
        return out.index_put((rows.reshape(-1), self.idx.reshape(-1)),
                             self.V.reshape(b * t, n), accumulate=True).reshape(b, -1)


@dataclass(frozen=True)
class Dense:
    """``c_i = G[i]``; ``G``: ``[b, *block_shape]``."""

    G: Tensor

    def sq_norm(self) -> Tensor:
        return self.G.reshape(self.G.shape[0], -1).square().sum(1)

    def materialize(self) -> Tensor:
        return self.G.reshape(self.G.shape[0], -1)


class Contribution(Protocol):
    """Anything that gives per-sample squared norms ``[b]`` and the per-sample gradients
    ``[b, numel]`` (row-major in the parameter's layout) of one use."""

    def sq_norm(self) -> Tensor: ...

    def materialize(self) -> Tensor: ...


@dataclass(frozen=True)
class Piece:
    """One use's contribution to the per-sample gradients of ``param``.

    ``rows = (r0, r1)`` says the piece covers ``param[r0:r1]`` only (e.g. the query block of
    ``in_proj_weight``); ``None`` means the whole parameter.
    """

    param: Tensor
    contrib: Contribution
    rows: tuple[int, int] | None = None


def factored_sq_norm(U: Tensor, V: Tensor, method: str | None = None) -> Tensor:
    """``‖Σ_t U_t ⊗ V_t‖²`` per sample (summed over groups), by the cheaper exact route.

    ``method`` forces ``"gram"`` (``Σ_{t,s}(U_t·U_s)(V_t·V_s)``) or ``"dense"`` (materialise
    ``Σ_t U_t V_tᵀ``); by default Gram is used when ``T(m+n) ≤ m·n``.
    """
    b, g, t, m = U.shape
    n = V.shape[-1]
    if t == 1 and method is None:
        return (U.square().sum(-1) * V.square().sum(-1)).sum((1, 2))
    if method is None:
        method = "gram" if t * (m + n) <= m * n else "dense"
    if method == "gram":
        return chunked(lambda u, v: ((u @ u.mT) * (v @ v.mT)).sum((1, 2, 3)), (U, V),
                        2 * g * t * t, b)
    if method == "dense":
        return chunked(lambda u, v: (u.mT @ v).square().sum((1, 2, 3)), (U, V), g * m * n, b)
    raise ValueError(f"method must be 'gram', 'dense' or None, got {method!r}")


def _merge(contribs: Sequence[Contribution]) -> Contribution:
    """Sum of several contributions to the same block, kept factored when possible."""
    if len(contribs) == 1:
        return contribs[0]
    first = contribs[0]
    if isinstance(first, Factored) and all(
        isinstance(c, Factored) and c.U.shape[1] == first.U.shape[1]
        and c.U.shape[3] == first.U.shape[3] and c.V.shape[3] == first.V.shape[3]
        and c.v_layout == first.v_layout for c in contribs
    ):
        fs = [c for c in contribs if isinstance(c, Factored)]
        return Factored(torch.cat([c.U for c in fs], 2), torch.cat([c.V for c in fs], 2),
                        first.v_layout)
    if isinstance(first, Indexed) and all(
        isinstance(c, Indexed) and c.num_rows == first.num_rows
        and c.V.shape[-1] == first.V.shape[-1] for c in contribs
    ):
        ix = [c for c in contribs if isinstance(c, Indexed)]
        return Indexed(torch.cat([c.idx for c in ix], 1), torch.cat([c.V for c in ix], 1),
                       first.num_rows)
    total = contribs[0].materialize()
    for c in contribs[1:]:
        total = total + c.materialize()
    return Dense(total)


def indexed_factored_inner(a: Indexed, f: Factored) -> Tensor:
    """``⟨c_A, c_B⟩`` per sample for ``c_A = Σ_t e_{idx_t} ⊗ V^A_t`` and ``c_B = Σ_s U_s ⊗ V_s``
    (one group, rows = ``num_rows``): ``Σ_{t,s} U_s[idx_t] (V^A_t · V_s)``, never forming a
    ``[rows, n]`` matrix (a tied embedding / output layer: ``b·T·S·n`` flops instead of
    ``b·rows·n`` memory)."""
    b, t = a.idx.shape
    u = f.U[:, 0]  # [b, S, rows]
    gathered = u.gather(2, a.idx.unsqueeze(1).expand(b, u.shape[1], t))  # [b, S, T]
    vv = f.V[:, 0] @ a.V.mT  # [b, S, T]

    def inner(g: Tensor, w: Tensor) -> Tensor:
        return (g * w).sum((1, 2))

    return chunked(inner, (gathered, vv), 2 * u.shape[1] * t, b)


def _tied_pair(c: Sequence[Contribution]) -> tuple[Indexed, Factored] | None:
    if len(c) != 2:
        return None
    a, f = (c[0], c[1]) if isinstance(c[0], Indexed) else (c[1], c[0])
    if (isinstance(a, Indexed) and isinstance(f, Factored) and f.U.shape[1] == 1
            and f.v_layout is None and f.U.shape[3] == a.num_rows
            and f.V.shape[3] == a.V.shape[-1]):
        return a, f
    return None


def _sum_sq_norm(contribs: Sequence[Contribution]) -> Tensor:
    """``‖Σ c‖²`` per sample: same-kind pieces merged; an Indexed + Factored pair by the cross
    term; anything else materialised."""
    kinds: dict[type, list[Contribution]] = {}
    for c in contribs:
        kinds.setdefault(type(c), []).append(c)
    merged = [_merge(cs) for cs in kinds.values()]
    pair = _tied_pair(merged)
    if pair is not None:
        a, f = pair
        return a.sq_norm() + f.sq_norm() + 2 * indexed_factored_inner(a, f)
    return _merge(merged).sq_norm()


def param_sq_norm(param: Tensor, pieces: Sequence[Piece]) -> Tensor:
    """``‖Σ_pieces c_i‖²`` per sample for one parameter (exact; see the module docstring)."""
    groups: dict[tuple[int, int] | None, list[Contribution]] = {}
    for p in pieces:
        groups.setdefault(p.rows, []).append(p.contrib)
    keys = list(groups)
    if len(keys) == 1 or _disjoint(keys):
        total = None
        for k in keys:
            s = _sum_sq_norm(groups[k])
            total = s if total is None else total + s
        assert total is not None
        return total
    # Overlapping row blocks: materialise everything at full size and add before squaring.
    n_rows = param.shape[0]
    row_len = param[0].numel()
    full = None
    for k, cs in groups.items():
        block = _merge(cs).materialize()
        b = block.shape[0]
        r0, r1 = (0, n_rows) if k is None else k
        block = block.reshape(b, r1 - r0, row_len)
        padded = torch.nn.functional.pad(block, (0, 0, r0, n_rows - r1))
        full = padded if full is None else full + padded
    assert full is not None
    return full.reshape(full.shape[0], -1).square().sum(1)


def _disjoint(keys: Sequence[tuple[int, int] | None]) -> bool:
    if any(k is None for k in keys):
        return False
    spans = sorted(k for k in keys if k is not None)
    return all(a[1] <= b[0] for a, b in pairwise(spans))
