"""The functional core: exact squared norms of factored / indexed / dense per-sample pieces,
each checked against the materialised per-sample gradient (float64)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neurothermo.gradstats import _pieces
from neurothermo.gradstats._pieces import (
    Dense,
    Factored,
    Indexed,
    Piece,
    factored_sq_norm,
    param_sq_norm,
)

DT = torch.float64


def dense_ref(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Σ_t U_t V_tᵀ per sample and group, squared and summed, by an explicit loop over t."""
    M = torch.zeros(U.shape[0], U.shape[1], U.shape[3], V.shape[3], dtype=DT)
    for t in range(U.shape[2]):
        M += U[:, :, t, :, None] * V[:, :, t, None, :]
    return M.square().sum((1, 2, 3))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 4), g=st.integers(1, 3), t=st.integers(1, 6), m=st.integers(1, 5),
       n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_factored_routes_agree_with_explicit_sum(b, g, t, m, n, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(b, g, t, m, dtype=DT, generator=gen)
    V = torch.randn(b, g, t, n, dtype=DT, generator=gen)
    ref = dense_ref(U, V)
    # Rounding bound: every route sums terms of size at most (Σ_t ‖U_t‖‖V_t‖)², which can be far
    # above the result when the per-sample gradient nearly cancels; 1e-12 of it is ~5000 ulps.
    bound = 1e-12 * (U.norm(dim=-1) * V.norm(dim=-1)).sum(2).square().sum(1)
    mat = Factored(U, V).materialize()
    assert mat.shape == (b, g * m * n)
    for got in [factored_sq_norm(U, V, r) for r in (None, "gram", "dense")] + [mat.square().sum(1)]:
        assert bool(((got - ref).abs() <= bound).all()), (got, ref)


def test_chunking_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    U, V = torch.randn(7, 2, 5, 3, dtype=DT), torch.randn(7, 2, 5, 4, dtype=DT)
    whole = [factored_sq_norm(U, V, m) for m in ("gram", "dense")]
    monkeypatch.setattr(_pieces, "_CHUNK_ELEMENTS", 50)  # forces chunks of 1-2 samples
    for m, w in zip(("gram", "dense"), whole):
        torch.testing.assert_close(factored_sq_norm(U, V, m), w, rtol=1e-14, atol=0)


def test_unknown_method_is_rejected() -> None:
    U = torch.randn(2, 1, 3, 2, dtype=DT)
    with pytest.raises(ValueError, match="method must be"):
        factored_sq_norm(U, U, "svd")


def test_indexed_repeated_rows_add_before_squaring() -> None:
    idx = torch.tensor([[1, 1, 3], [0, 2, 2]])
    V = torch.randn(2, 3, 4, dtype=DT)
    piece = Indexed(idx, V, num_rows=5)
    ref = torch.stack([
        (V[0, 0] + V[0, 1]).square().sum() + V[0, 2].square().sum(),
        V[1, 0].square().sum() + (V[1, 1] + V[1, 2]).square().sum(),
    ])
    torch.testing.assert_close(piece.sq_norm(), ref, rtol=1e-14, atol=0)
    full = piece.materialize().reshape(2, 5, 4)
    torch.testing.assert_close(full[0, 1], V[0, 0] + V[0, 1])
    assert torch.equal(full[0, 0], torch.zeros(4, dtype=DT))


def _materialised(param: torch.Tensor, pieces: list[Piece]) -> torch.Tensor:
    b = pieces[0].contrib.materialize().shape[0]
    full = torch.zeros(b, *param.shape, dtype=DT)
    for p in pieces:
        block = p.contrib.materialize()
        r0, r1 = (0, param.shape[0]) if p.rows is None else p.rows
        full[:, r0:r1] += block.reshape(b, r1 - r0, *param.shape[1:])
    return full.flatten(1).square().sum(1)


def test_pieces_on_row_blocks_disjoint_overlapping_and_mixed_kinds() -> None:
    torch.manual_seed(0)
    param = torch.zeros(6, 4, dtype=DT)
    b = 3

    def fac(rows: int, t: int) -> Factored:
        return Factored(torch.randn(b, 1, t, rows, dtype=DT), torch.randn(b, 1, t, 4, dtype=DT))

    disjoint = [Piece(param, fac(2, 3), (0, 2)), Piece(param, fac(2, 2), (2, 4)),
                Piece(param, fac(2, 1), (4, 6)), Piece(param, fac(2, 2), (0, 2))]
    overlapping = [Piece(param, fac(3, 2), (0, 3)), Piece(param, fac(4, 2), (2, 6)),
                   Piece(param, Dense(torch.randn(b, 6, 4, dtype=DT)))]
    mixed = [Piece(param, Indexed(torch.randint(0, 6, (b, 5)), torch.randn(b, 5, 4, dtype=DT), 6)),
             Piece(param, fac(6, 3)), Piece(param, Dense(torch.randn(b, 6, 4, dtype=DT)))]
    for pieces in (disjoint, overlapping, mixed, mixed[:1] * 2):
        torch.testing.assert_close(param_sq_norm(param, pieces), _materialised(param, pieces),
                                   rtol=1e-12, atol=0)


def test_sq_norm_is_differentiable() -> None:
    U = torch.randn(2, 1, 4, 3, dtype=DT, requires_grad=True)
    V = torch.randn(2, 1, 4, 5, dtype=DT)
    for method in ("gram", "dense"):
        (g,) = torch.autograd.grad(factored_sq_norm(U, V, method).sum(), U)
        (ref,) = torch.autograd.grad(dense_ref(U, V).sum(), U)
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_tied_indexed_and_factored_pieces_add_before_squaring_without_materialising(seed) -> None:
    # A tied embedding / output layer: ‖c_A + c_B‖² by the cross term equals the materialised sum
    # (tokens repeat within a sample, so rows are shared by both uses and by several positions).
    gen = torch.Generator().manual_seed(seed)
    b, t, s, rows, n = 3, 5, 4, 6, 2
    a = Indexed(torch.randint(0, rows, (b, t), generator=gen), torch.randn(b, t, n, dtype=DT,
                generator=gen), rows)
    f = Factored(torch.randn(b, 1, s, rows, dtype=DT, generator=gen),
                 torch.randn(b, 1, s, n, dtype=DT, generator=gen))
    p = torch.zeros(rows, n, dtype=DT)
    ref = (a.materialize() + f.materialize()).square().sum(1)
    calls = []
    orig = Indexed.materialize
    Indexed.materialize = lambda self: calls.append(1) or orig(self)  # type: ignore[method-assign]
    try:
        got = param_sq_norm(p, [Piece(p, f), Piece(p, a)])
    finally:
        Indexed.materialize = orig  # type: ignore[method-assign]
    assert not calls, "the tied pair must not be materialised"
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
