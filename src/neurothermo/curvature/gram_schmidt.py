"""Gram–Schmidt passes over a Krylov basis stored by columns (``operator.column_block``), and the
random vectors the solvers start from.

Every function here reads or writes vectors of ``n`` numbers, the memory traffic that dominates a
solver's own arithmetic on large models: each is written to touch each vector as few times as the
result allows (``band_pass`` reads a vector's coefficients and its squared norm in one pass,
``subtract`` folds the normalisation into the subtraction).
"""
from __future__ import annotations

import torch
from torch import Tensor

from neurothermo.curvature.operator import column_block

# Reorthogonalise once more only when a full projection removed more than 1 − 1/√2 of the vector's
# norm (Daniel, Gragg, Kaufman & Stewart 1976, as in ARPACK): otherwise that classical Gram–Schmidt
# pass already left the vector orthogonal to working precision. Each pass reads the whole basis,
# the bookkeeping that dominates on large models.
DGKS = 2 ** -0.5

# Inner products over n numbers are summed in pieces of this length, the pieces' sums added in
# float64: a float32 dot product of 11 M terms summed in one go is off by ~1e-3 relative (measured:
# ‖v‖² of a Gaussian vector 8.7e-4 low; summed by pieces 2.6e-6), which is the size of the
# tolerances asked for. Reading pieces costs the same memory passes (one gemv each).
DOT_CHUNK = 1 << 18


def column_dots(B: Tensor, w: Tensor) -> Tensor:
    """``Bᵀ w`` for ``B`` of shape ``(n, c)`` stored by columns and ``w`` of length ``n``, float64
    on the CPU, summed by pieces of ``DOT_CHUNK`` (see there): one pass over ``B`` and ``w``."""
    n = w.shape[0]
    Bt = B.T
    if n <= DOT_CHUNK:
        return (Bt @ w).double().cpu()
    parts = [Bt[:, i:i + DOT_CHUNK] @ w[i:i + DOT_CHUNK] for i in range(0, n, DOT_CHUNK)]
    return torch.stack(parts).double().sum(0).cpu()


def band_pass(V: Tensor, end: int, segs: tuple[tuple[int, int], ...]) -> tuple[list[Tensor], float]:
    """Coefficients of ``w = V[:, end]`` on the column ranges ``segs`` (classical Gram–Schmidt, not
    yet subtracted) and ``‖w‖²``, reading ``w`` once: the last range ends at ``end``, so its product
    includes ``w`` itself. Coefficients float64 on the CPU."""
    w = V[:, end]
    coef = [column_dots(V[:, s0:s1], w) for s0, s1 in segs[:-1]]
    s0, s1 = segs[-1]
    last = column_dots(V[:, s0:s1 + 1], w)
    return [*coef, last[:-1]], float(last[-1])


def subtract(V: Tensor, end: int, segs: tuple[tuple[int, int], ...], coef: list[Tensor],
             scale: float = 1.0) -> None:
    """``V[:, end] ← (V[:, end] − Σ V[:, s0:s1] c) · scale`` in place, one pass per range."""
    w = V[:, end:end + 1]
    for i, ((s0, s1), c) in enumerate(zip(segs, coef)):
        w.addmm_(V[:, s0:s1], c.to(device=w.device, dtype=w.dtype)[:, None],
                 beta=scale if i == 0 else 1.0, alpha=-scale)


def random_block(n: int, p: int, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator | None) -> Tensor:
    """``p`` standard normal vectors (drawn on the CPU, so a seed gives the same numbers anywhere).

    Drawn in float32 for float32 (and lower-precision) operators, in float64 otherwise: drawing
    11 M float64 numbers to round them costs as much as a Hessian-vector product on ResNet-18.
    """
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(n, p, generator=generator, dtype=draw).to(device=device, dtype=dtype)


def random_column(out: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill the vector ``out`` with the numbers ``random_block(n, 1, ...)`` gives, in place (no
    temporary of ``n`` numbers where ``out`` is a contiguous CPU vector of the drawing dtype)."""
    n, dt = out.shape[0], out.dtype
    draw = torch.float64 if dt == torch.float64 else torch.float32
    if out.device.type == "cpu" and dt == draw and out.is_contiguous():
        return torch.randn(n, generator=generator, dtype=draw, out=out)
    return out.copy_(random_block(n, 1, dt, out.device, generator)[:, 0])


def orthonormalize(W: Tensor, basis: Tensor, tiny: float,
                   generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``W = Q R`` with ``Q ⊥ basis``, ``Q`` orthonormal (column-wise CGS2).

    ``W`` must already be orthogonal to ``basis``. A column whose remainder is ``≤ tiny`` (the block
    became dependent: an invariant subspace was found) is replaced by a random direction orthogonal to
    everything so far, with a zero in ``R``. Returns at most ``n − basis`` columns.
    """
    n, p = W.shape
    width = min(p, n - basis.shape[1])
    if p == 1 and width == 1:  # one column: normalise it (one pass over memory, no copies)
        nrm = float(torch.linalg.vector_norm(W))
        if nrm > tiny:
            return W / nrm, torch.tensor([[nrm]], dtype=torch.float64)
    Q = column_block(n, width, W.dtype, W.device)
    R = torch.zeros(width, p, dtype=torch.float64)
    cnt = 0
    for c in range(p):
        w = W[:, c].clone()
        for _ in range(2):
            if cnt:
                coef = Q[:, :cnt].T @ w
                w -= Q[:, :cnt] @ coef
                R[:cnt, c] += coef.double().cpu()
        if cnt == width:
            continue
        nrm = float(torch.linalg.vector_norm(w))
        if nrm > tiny:
            Q[:, cnt] = w / nrm
            R[cnt, c] = nrm
        else:
            z = random_block(n, 1, W.dtype, W.device, generator)[:, 0]
            full = torch.cat([basis, Q[:, :cnt]], dim=1)
            for _ in range(2):
                z -= full @ (full.T @ z)
            Q[:, cnt] = z / torch.linalg.vector_norm(z)
        cnt += 1
    return Q, R


def project(V: Tensor, end: int,
            segs: tuple[tuple[int, int], ...]) -> tuple[list[Tensor], list[Tensor] | None, float]:
    """Project ``w = V[:, end]`` on the orthonormal column ranges ``segs``: one classical Gram–Schmidt
    pass, a second when DGKS says the first cancelled too much (see DGKS above).

    The norm after a pass follows from Pythagoras, ``‖w − V c‖² = ‖w‖² − ‖c‖²`` (the ranges are
    orthonormal), with ``‖w‖²`` read in the same pass as the coefficients; it is exact to rounding
    whenever no second pass is due (at most half of ``‖w‖²`` removed). The last pass's coefficients
    are returned unsubtracted (``pending``) for the caller to subtract together with the
    normalisation; after two passes that still cancelled, everything is subtracted (``None``) and the
    norm computed directly.

    Returns:
        (coefficients per range, summed over the passes, float64 CPU; pending coefficients or
        None; ``‖w − V c‖``).
    """
    total: list[Tensor] = []
    for attempt in range(2):
        coef, ww = band_pass(V, end, segs)
        total = coef if attempt == 0 else [t + c for t, c in zip(total, coef)]
        after2 = ww - sum(float(c.square().sum()) for c in coef)
        if after2 >= DGKS * DGKS * ww:  # False for NaN: caught by the caller's finiteness check
            return total, coef, after2 ** 0.5
        subtract(V, end, segs, coef)
    w = V[:, end]
    return total, None, float(column_dots(V[:, end:end + 1], w)[0]) ** 0.5
