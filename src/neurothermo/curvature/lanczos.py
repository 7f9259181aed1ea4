"""Largest eigenvalues of a symmetric operator: block Lanczos with partial reorthogonalisation and
thick restart (Krylov–Schur), stopped on Ritz residuals.

The algorithm keeps an orthonormal basis ``V = [V_done, V_pend]`` and the projected matrix
``T = Vᵀ H V``: ``V_done`` holds the vectors already multiplied, ``V_pend`` the next ``p`` (at the
start: the ``p`` start vectors). It advances one product at a time (band Lanczos, Ruhe 1979): multiply
the oldest pending vector, project the result on the band of vectors it couples to (and on the Ritz
vectors kept at the last restart) and append the normalised remainder as a new pending vector. Its
overlap with the older vectors, which rounding makes grow once a Ritz value converges (the origin of
ghost copies of converged eigenvalues, Paige 1976), is estimated by the ω-recurrence (Simon 1984,
``band_lanczos``) without reading them; only when an estimate exceeds ``ε^¾`` is the vector projected
on the whole basis. So most products cost a few passes over ``n`` numbers instead of ``2m`` (an
``m``-vector basis), and the basis stays orthogonal to ``ε^¾`` (no ghosts). A step's own
arithmetic is two passes over the new vector: one reads it with its band (the coefficients and its
squared norm together, ``gram_schmidt.project``), one subtracts the band and normalises (the norm
after the subtraction follows from Pythagoras); inner products are summed by pieces in float64
(``gram_schmidt.column_dots``). The basis spans the
same block Krylov space as a block step of ``p`` products would, but convergence is checked after
every product instead of every ``p``. Since every product's coefficients are kept,
``H V_done = V T[:, done]`` holds (to rounding), so a Ritz pair ``(θ_i, y_i = V_done s_i)`` of
``T[done, done]`` has residual

    r_i = ‖H y_i − θ_i y_i‖ = ‖T[pend, done] · s_i‖,

known without another product. Error estimate of ``θ_i`` (``ritz_errors``): ``r_i`` alone bounds
the distance to *some* eigenvalue; the quadratic bound ``‖R_C‖²/δ_C`` for a cluster ``C ∋ i`` of
Ritz values (Kato–Temple for ``C = {i}``) is much sharper, with the gap ``δ_C`` to the rest of the
spectrum estimated from the other Ritz values. That is an estimate, not a guarantee, as for every
Krylov stopping rule: a random start may miss an eigenvalue for a while, and the Ritz values of a
small basis say little about the rest of the spectrum, so gaps are trusted only once the basis has
``gap_after`` vectors (default 20; measured on 34 snapshots of MLPs trained on digits × 4 seeds,
k = 1, tol = 1e-3: with 5 or 10 a random start stopped early, off by up to 1.2%, in 5–7% of the
136 runs, with 20 in none; the worst error was then 3e-5). Pair ``i`` has converged when
``e_i ≤ tol · max(|θ_i|, √ε_mach · max_j |θ_j|)``.

When the basis is full it is restarted on the best ``ℓ`` Ritz vectors plus the pending vectors
(thick restart: no information about the wanted pairs is lost; ``T[pend, Ritz] = T[pend, done] S``
carries the residual coupling over). Memory: the basis is one ``(m_max + 1) × n`` block written
a column per product (``operator.column_block``); on the CPU it, the restart temporaries and the
returned Ritz block come from ``huge_pages.empty_large``, so each new column's first write is a
few 2 MiB page faults when huge pages are turned on (``NEUROTHERMO_HUGE_PAGES=1``; off by default).
A block of ``p ≥ m`` vectors resolves an
eigenvalue of multiplicity ``m``; single-vector Krylov methods (``p = 1``) see one copy of a repeated
eigenvalue only, which is why the default block size is ``k``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from neurothermo._validate import check_int, check_positive
from neurothermo.curvature.gram_schmidt import (
    column_dots,
    orthonormalize,
    project,
    random_block,
    random_column,
    subtract,
)
from neurothermo.curvature.huge_pages import empty_large
from neurothermo.curvature.operator import LinearOperator, column_block


class ConvergenceWarning(UserWarning):
    """An eigenvalue or trace solver stopped at its product budget before reaching ``tol``."""


@dataclass(frozen=True)
class RitzResult:
    """Eigenpairs of a flat operator, largest first, with their error estimates.

    ``values``/``residuals``/``errors``: float64 ``(k,)`` on the CPU; ``vectors``: ``(n, k)``
    orthonormal columns in the operator's dtype/device; ``n_matvec``: products used;
    ``block``: the top ``max(k + 2, block_size)`` Ritz vectors (when the basis has them), material
    for the start block of a warm restart. Returned by :func:`lanczos` and :func:`power_iteration`.

    Attributes:
        values: ``(k,)`` float64 eigenvalue estimates, largest first (CPU).
        vectors: ``(n, k)`` orthonormal Ritz vectors (the operator's dtype and device).
        residuals: ``(k,)`` ``‖op u − λ u‖``.
        errors: ``(k,)`` error estimates of ``values``.
        n_matvec: products used.
        converged: whether every error reached ``tol``.
        block: the top Ritz vectors for a warm restart, or None (when the solver was asked
            not to keep it).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    errors: Tensor
    n_matvec: int
    converged: bool
    block: Tensor | None = None


def ritz_errors(theta: Tensor, resid: Tensor, gap_after: int = 2, count: int | None = None,
                max_cluster: int = 4, gap_scale: float = 1.0) -> Tensor:
    """Error estimates of the Ritz values ``theta`` (descending) from their residuals.

    For a cluster ``C`` of consecutive Ritz values (up to ``max_cluster``), the quadratic residual
    bound for Hermitian matrices (Mathias 1998; Li & Li 2005) gives ``|λ − θ| ≤ ‖R_C‖² / δ_C`` for
    its members, ``‖R_C‖² ≤ Σ_{j∈C} r_j²`` and ``δ_C`` the gap to the rest of the spectrum, estimated
    by the distance to the neighbouring Ritz values. ``C = {i}`` is the Kato–Temple estimate;
    clusters keep the estimate sharp for nearly equal eigenvalues, whose individual gaps are tiny.
    The estimate is ``min(r_i, min_C ‖R_C‖²/δ_C)``; with fewer than ``gap_after`` Ritz values no gap
    is trusted (``r_i``). Computed for the first ``count`` values (the rest: ``r_i``). ``gap_scale``
    (≤ 1) counts each Ritz gap as ``gap_scale·δ_C``: a margin for Ritz values that lag their
    eigenvalues (``θ_j ≤ λ_j``, so Ritz gaps overestimate the true ones; ``tracker.py``).
    """
    m = theta.numel()
    err = resid.clone()
    if m < max(2, gap_after):
        return err
    th, r = theta.tolist(), resid.tolist()
    for i in range(m if count is None else min(count, m)):
        best = r[i]
        for a in range(max(0, i - max_cluster + 1), i + 1):
            for b in range(i, min(m, a + max_cluster)):
                above = th[a - 1] - th[a] if a > 0 else float("inf")
                below = th[b] - th[b + 1] if b + 1 < m else float("inf")
                gap = gap_scale * min(above, below)
                if 0 < gap < float("inf"):
                    best = min(best, sum(x * x for x in r[a:b + 1]) / gap)
        err[i] = best
    return err


def converged_mask(values: Tensor, errors: Tensor, tol: float, all_values: Tensor,
                   dtype: torch.dtype) -> Tensor:
    floor = torch.finfo(dtype).eps ** 0.5 * float(all_values.abs().max())
    return errors <= tol * values.abs().clamp(min=floor)


def _check_common(op: LinearOperator, k: int, tol: float, max_matvec: int | None) -> int:
    check_int("k", k)
    if k >= op.size:
        raise ValueError(f"k={k} must be smaller than the number of parameters ({op.size}); "
                         "for the full spectrum form the dense Hessian instead")
    check_positive("tol", tol)
    if max_matvec is None:
        return 200 + 50 * k
    return check_int("max_hvp", max_matvec, minimum=k)


def lanczos(op: LinearOperator, k: int = 1, *, tol: float = 1e-3, max_matvec: int | None = None,
            block_size: int | None = None, max_basis: int | None = None, start: Tensor | None = None,
            generator: torch.Generator | None = None, gap_after: int = 20,
            keep_block: bool = True) -> RitzResult:
    """The ``k`` algebraically largest eigenpairs of ``op`` (module docstring).

    ``block_size`` p (default ``k``), ``max_basis`` (default ``max(30, 2k + 4p)``, capped at ``n``),
    ``start``: ``(n, s)`` initial vectors (warm start; padded with random vectors to ``p``),
    ``gap_after``: basis size from which the gap estimate ``r²/gap`` is trusted (before: ``r``),
    ``keep_block``: also return ``block`` (material for a warm restart).

    Args:
        op: a symmetric :class:`LinearOperator` of size n.
        k: how many of the largest eigenvalues (1 ≤ k < n).
        tol: relative accuracy of each eigenvalue (> 0): stop when every error estimate is
            ``≤ tol·|λ|``.
        max_matvec: the cap on products (≥ k); None: ``200 + 50k``.
        block_size: the block size p (1 ≤ p < n); None: ``k``.
        max_basis: the basis size at which the basis is restarted (thick restart); None: as above.
        start: ``(n, s)`` warm-start vectors; None: random.
        generator: the random source of the start block (drawn on the CPU).
        gap_after: the basis size from which ``r²/gap`` error estimates are used (≥ 1).
        keep_block: also return the top Ritz vectors as ``block`` (for a warm restart).

    Returns:
        A :class:`RitzResult`, largest first, with residuals and error estimates.

    Raises:
        TypeError: non-int ``k``/``max_matvec`` or a non-number ``tol``.
        ValueError: ``k`` < 1 or ≥ n, ``tol`` ≤ 0, ``max_matvec`` < k, ``block_size`` out of range,
            ``max_basis`` < k + 2p, a ``start`` of the wrong shape.
        FloatingPointError: a product contains NaN or Inf.

    Warns:
        ConvergenceWarning: the budget ran out before ``tol`` was met (the estimate is returned).

    Example:
        >>> import torch
        >>> from neurothermo.curvature import DenseOperator, lanczos
        >>> op = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = lanczos(op, k=2, tol=1e-8)
        >>> [round(v, 6) for v in res.values.tolist()], res.converged
        ([10.0, 9.0], True)
    """
    return band_lanczos(op, k, tol=tol, max_matvec=max_matvec, block_size=block_size,
                        max_basis=max_basis, start=start, generator=generator, gap_after=gap_after,
                        keep_block=keep_block)


def orthogonality_level(dtype: torch.dtype) -> float:
    """Largest estimated ``|v_i·v_j|`` the basis may reach before a full reorthogonalisation: ``ε^¾``.

    Semi-orthogonality (``√ε``) already keeps the projected matrix's eigenvalues accurate to
    ``O(ε‖H‖)`` (Simon 1984); ``ε^¾`` also keeps the returned Ritz vectors orthogonal to
    ``≈ m·ε^¾`` (float64: 1e-11, float32: 1e-4 at m = 30) instead of ``m·√ε``.
    """
    return math.pow(torch.finfo(dtype).eps, 0.75)


def band_lanczos(op: LinearOperator, k: int = 1, *, tol: float = 1e-3, max_matvec: int | None = None,
                 block_size: int | None = None, max_basis: int | None = None,
                 start: Tensor | None = None, generator: torch.Generator | None = None,
                 gap_after: int = 20, reorth: str = "partial",
                 stats: dict[str, int] | None = None, keep_block: bool = True) -> RitzResult:
    """``lanczos`` with the choice of reorthogonalisation (``reorth``):

    * ``"full"``: every new vector is projected on the whole basis (one classical Gram–Schmidt pass,
      a second when DGKS asks): ``≈ 2m`` passes over ``n`` numbers per product for an ``m``-vector
      basis, which dominates the bookkeeping on large models.
    * ``"partial"`` (default): every new vector is projected on the band it was built from (the
      vectors a Lanczos step couples: ``p`` before the multiplied one, the pending ones); its
      overlap with the older vectors is *estimated* without touching them, by the ω-recurrence
      (Simon 1984), generalised here to the band/restarted projected matrix ``T``: from
      ``H V_done = V T[:, done] + F`` and ``Ω = VᵀV``,

          T[e, a] · Ω[e, j] = (Ω T − T Ω)[a, j]   for every multiplied ``j`` outside the band,

      plus a rounding term ``±ε·2‖T‖`` each step. Only when an estimate exceeds
      ``orthogonality_level`` (``ε^¾``) is the new vector projected on the whole basis, and its
      estimates are reset to ``ε``. Restarts carry ``Ω`` over exactly as the basis: ``SᵀΩS``.

    ``stats`` (a dict, optional) receives ``full_passes``: how many products needed a full pass.
    ``keep_block=False``: compute only the ``k`` wanted Ritz vectors, no ``block`` for a warm
    restart (each further vector is a pass over the basis and ``n`` new numbers).
    """
    if reorth not in ("partial", "full"):
        raise ValueError(f"reorth must be 'partial' or 'full', got {reorth!r}")
    n = op.size
    budget = _check_common(op, k, tol, max_matvec)
    p = k if block_size is None else check_int("block_size", block_size, maximum=n - 1)
    check_int("gap_after", gap_after)
    m_max = min(n, max(30, 2 * k + 4 * p) if max_basis is None else max_basis)
    if m_max < min(n, k + 2 * p):
        raise ValueError(f"max_basis={max_basis} too small: need at least k + 2·block_size = {k + 2 * p}")
    dt, dev = op.dtype, op.device
    eps = float(torch.finfo(dt).eps)
    level = orthogonality_level(dt) if reorth == "partial" else -1.0
    V = column_block(n, m_max + 1, dt, dev, zero=False)  # only written columns are read
    T = torch.zeros(m_max + 1, m_max + 1, dtype=torch.float64)
    Om = torch.eye(m_max + 1, dtype=torch.float64)  # estimates of VᵀV (partial reorthogonalisation)
    if p == 1 and start is None:  # drawn and normalised in place: no temporary of n numbers
        random_column(V[:, 0], generator)
        V[:, 0].div_(float(column_dots(V[:, :1], V[:, 0])[0]) ** 0.5)
    else:
        Q0 = random_block(n, p, dt, dev, generator)
        if start is not None:
            if start.ndim != 2 or start.shape[0] != n:
                raise ValueError(f"start must have shape ({n}, s), got {tuple(start.shape)}")
            s = min(start.shape[1], p)
            Q0[:, :s] = start[:, :s].to(device=dev, dtype=dt)
        V[:, :p], _ = orthonormalize(Q0, V[:, :0], 1e-12 * float(Q0.abs().max()), generator)
    Om[:p, :p] += eps * (1 - torch.eye(p, dtype=torch.float64))
    a, end = 0, p  # V[:, :a] multiplied, V[:, a:end] pending (p of them until the space is full)
    used = op.n_matvec
    full_passes = 0
    norm_T = 0.0
    kept = 0  # Ritz vectors kept at the last restart: V[:, :kept]
    while True:
        # the product goes straight into the basis slot of the new vector (no n-vector allocated)
        w = op.matmat(V[:, a:a + 1], out=V[:, end:end + 1])
        # The band (in exact arithmetic H v_a lies in span V[:, a-p:end]), a second band pass when
        # DGKS says the first cancelled too much (see DGKS above).
        # The band: the vectors a Lanczos step couples (p before v_a, the pending ones), and the Ritz
        # vectors kept at the last restart (coupled to the pending vectors of that restart, and
        # not re-estimated: their overlaps with later vectors are projected out explicitly).
        # ``project`` leaves its last coefficients unsubtracted (``pending``): they are subtracted
        # together with the normalisation below, one pass over w instead of two.
        lo = max(kept, a - p)
        segs = ((0, kept), (lo, end)) if lo > kept > 0 else ((0 if kept else lo, end),)
        total, pending, after = project(V, end, segs)
        hc = torch.zeros(end, dtype=torch.float64)
        for (s0, s1), c in zip(segs, total):
            hc[s0:s1] += c
        if not (bool(torch.isfinite(hc).all()) and math.isfinite(after)):
            raise FloatingPointError(
                "a Hessian-vector product contains NaN or Inf; the loss is not twice "
                "differentiable at these parameters (or overflows)")
        T[:end, a] = hc
        T[a, :end] = hc
        norm_T = max(norm_T, float(hc.abs().sum()) + after)
        # Estimated overlaps of the new vector with the multiplied vectors between them.
        full = reorth == "full"
        if not full and lo > kept:
            comm = Om[a, :end] @ T[:end, kept:lo] - T[:end, a] @ Om[:end, kept:lo]
            est = (comm + torch.sign(comm) * (2 * eps * norm_T)) / max(after, 1e-300)
            full = bool(est.abs().max() > level)
            Om[end, kept:lo] = Om[kept:lo, end] = est  # end ≤ m_max: the basis has room
        if full:  # project on the whole basis (classical Gram–Schmidt), twice when DGKS says so
            full_passes += 1
            if pending is not None:  # not subtracted yet: the full pass measures them again
                for (s0, s1), c in zip(segs, pending):
                    hc[s0:s1] -= c
            segs = ((0, end),)
            total, pending, after = project(V, end, segs)
            hc = hc + total[0]
            T[:end, a] = hc
            T[a, :end] = hc
            Om[end, kept:lo] = Om[kept:lo, end] = eps
        Om[end, :kept] = Om[:kept, end] = eps
        Om[end, lo:end] = Om[lo:end, end] = eps
        a += 1
        theta, S = torch.linalg.eigh(T[:a, :a])
        theta, S = theta.flip(0), S.flip(1)
        tiny = 100 * eps * max(float(theta.abs().max()), 1e-300)
        if after > tiny and end < n:  # subtract what is pending and normalise: one pass over w
            if pending is None:
                w.div_(after)  # w is V[:, end]
            else:
                subtract(V, end, segs, pending, scale=1 / after)
            T[end, a - 1] = T[a - 1, end] = after
            end += 1
        else:  # the Krylov space is exhausted here (or full): orthonormalize handles both
            if pending is not None:
                subtract(V, end, segs, pending)
            q, r = orthonormalize(w, V[:, :end], tiny, generator)
            if q.shape[1]:
                V[:, end] = q[:, 0]
                T[end, a - 1] = T[a - 1, end] = r[0, 0]
                Om[end, :end] = Om[:end, end] = eps
                end += 1
        resid = torch.linalg.vector_norm(T[a:end, :a] @ S, dim=0)
        errors = ritz_errors(theta, resid, gap_after, count=k)
        done = a >= k and bool(converged_mask(theta[:k], errors[:k], tol, theta, dt).all())
        if done or a == end or op.n_matvec - used + 1 > budget:
            break
        if end > m_max:  # thick restart on the best ell Ritz vectors, keeping the pending vectors
            ell = min(max(k + p, m_max // 2), m_max - 2 * p)
            pend = end - a
            coupling = T[a:end, :a] @ S[:, :ell]
            Sl = S[:, :ell]
            om_rr = Sl.T @ Om[:a, :a] @ Sl  # the estimates transform as the basis does
            om_rp = Sl.T @ Om[:a, a:end]
            om_pp = Om[a:end, a:end].clone()
            # the restart's temporaries in large pages too (same products as ``clone`` and ``@``)
            pend_vecs = column_block(n, pend, dt, dev, zero=False).copy_(V[:, a:end])
            rotated = empty_large((n, ell), dt, dev)
            V[:, :ell] = torch.mm(V[:, :a], Sl.to(device=dev, dtype=dt), out=rotated)
            del rotated
            V[:, ell:ell + pend] = pend_vecs
            T.zero_()
            T[:ell, :ell] = torch.diag(theta[:ell])
            T[ell:ell + pend, :ell] = coupling
            T[:ell, ell:ell + pend] = coupling.T
            Om = torch.eye(m_max + 1, dtype=torch.float64)
            Om[:ell, :ell] = om_rr
            Om[:ell, ell:ell + pend] = om_rp
            Om[ell:ell + pend, :ell] = om_rp.T
            Om[ell:ell + pend, ell:ell + pend] = om_pp
            Om.fill_diagonal_(1.0)
            a, end, kept = ell, ell + pend, ell
    kk = min(k, a)
    # Ritz vectors as columns of a (c, n) row-major product: contiguous columns, one pass per column
    width = min(a, max(k + 2, p)) if keep_block else kk
    block = torch.mm(S[:, :width].T.to(device=dev, dtype=dt), V[:, :a].T,
                     out=empty_large((width, n), dt, dev)).T
    if stats is not None:
        stats["full_passes"] = full_passes
    if not done:
        warnings.warn(
            f"Lanczos stopped after {op.n_matvec - used} Hessian-vector products (max_hvp={budget}) "
            f"before reaching tol={tol}: error estimates {errors[:kk].tolist()} for eigenvalues "
            f"{theta[:kk].tolist()}; raise max_hvp or tol",
            ConvergenceWarning, stacklevel=3)
    return RitzResult(theta[:kk].clone(), block[:, :kk], resid[:kk].clone(), errors[:kk].clone(),
                      op.n_matvec - used, done, block if keep_block else None)
