"""Top eigenvalues: Lanczos and power iteration against eigvalsh of explicit and dense float64 Hessians."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import neurothermo as nt
from _helpers import (
    classification_data,
    cnn,
    deep_linear,
    dense_hessian,
    mlp,
    regression_data,
)
from neurothermo.curvature import (
    ConvergenceWarning,
    DenseOperator,
    FunctionOperator,
    lanczos,
    power_iteration,
)

CE = nn.CrossEntropyLoss()


def with_spectrum(ev: Tensor, seed: int = 0) -> Tensor:
    """``Q diag(ev) Qᵀ`` with a random orthogonal ``Q`` (float64)."""
    n = ev.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return Q @ torch.diag(ev.double()) @ Q.T


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- explicit matrices ----------------------------------------------------------------------

def test_repeated_eigenvalues_found_with_their_multiplicity_and_no_ghosts() -> None:
    # λ = 10, 9 (×3), 5 (×2), then 194 values in [-1, 3). With (partial) reorthogonalisation each
    # eigenvalue appears exactly as often as its multiplicity: a ghost would be a 4th copy of 9 or a
    # second 10; a single-vector method would miss copies. Block size k resolves multiplicity ≤ k.
    rest = torch.linspace(-1, 3, 194, dtype=torch.float64)
    ev = torch.cat([torch.tensor([10.0, 9, 9, 9, 5, 5], dtype=torch.float64), rest])
    A = with_spectrum(ev)
    for k in (4, 6, 7):
        res = lanczos(DenseOperator(A), k, tol=1e-10, generator=gen(1))
        expected = torch.sort(ev, descending=True).values[:k]
        assert res.converged
        torch.testing.assert_close(res.values, expected, rtol=1e-9, atol=1e-9)
        Y = res.vectors
        torch.testing.assert_close(Y.T @ Y, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
        # the residuals reported (from the projected matrix, no extra product) are the true ones
        true_resid = torch.linalg.vector_norm(A @ Y - Y * res.values, dim=0)
        torch.testing.assert_close(res.residuals, true_resid, rtol=1e-6, atol=1e-11)


def test_no_ghosts_over_long_runs_with_restarts() -> None:
    # λ1 = 100 converges in a few steps; the next three sit in a tight cluster that takes many steps
    # and several thick restarts (max_basis = 12). Plain Lanczos without reorthogonalisation
    # produces spurious copies of λ1 in such runs (Paige 1976); here values must be exact and distinct.
    ev = torch.cat([torch.tensor([100.0, 10.0, 9.9, 9.8], dtype=torch.float64),
                    torch.linspace(0, 9.5, 296, dtype=torch.float64)])
    A = with_spectrum(ev, seed=2)
    op = DenseOperator(A)
    res = lanczos(op, 4, tol=1e-10, block_size=1, max_basis=12, max_matvec=5000, generator=gen())
    assert res.converged
    assert res.n_matvec > 12  # restarts happened
    torch.testing.assert_close(res.values, ev[:4], rtol=1e-9, atol=1e-9)


def test_top_eigenvalues_are_algebraic_not_by_magnitude() -> None:
    ev = torch.cat([torch.tensor([-20.0, -15.0], dtype=torch.float64), torch.linspace(-3, 5, 78, dtype=torch.float64)])
    A = with_spectrum(ev, seed=3)
    for solver in (lanczos, power_iteration):
        res = solver(DenseOperator(A), 2, tol=1e-8, max_matvec=20000, generator=gen())
        # error estimates are ≤ tol·|λ| by construction; allow that plus rounding
        torch.testing.assert_close(res.values, torch.tensor([5.0, 5 - 8 / 77], dtype=torch.float64),
                                   rtol=1e-6, atol=0)


def test_error_estimates_bound_the_actual_error() -> None:
    ev = torch.cat([torch.tensor([3.0, 2.5, 2.4], dtype=torch.float64), torch.rand(197, dtype=torch.float64, generator=gen(4)) * 2])
    A = with_spectrum(ev, seed=4)
    top = torch.sort(ev, descending=True).values
    for tol in (1e-2, 1e-3, 1e-5):
        res = lanczos(DenseOperator(A), 3, tol=tol, generator=gen())
        err = (res.values - top[:3]).abs()
        assert bool((err <= res.residuals + 1e-12).all())  # rigorous: some eigenvalue within r
        assert bool((err <= tol * top[:3]).all())
        assert bool((res.errors <= tol * res.values.abs()).all())


def test_non_convergence_returns_estimate_residuals_and_warns() -> None:
    ev = torch.cat([torch.tensor([1.0, 0.999], dtype=torch.float64), torch.linspace(0, 0.99, 298, dtype=torch.float64)])
    A = with_spectrum(ev)
    for solver in (lanczos, power_iteration):
        with pytest.warns(ConvergenceWarning, match="max_hvp"):
            res = solver(DenseOperator(A), 1, tol=1e-12, max_matvec=8, generator=gen())
        assert not res.converged
        assert res.n_matvec <= 8
        assert bool(torch.isfinite(res.values).all()) and bool((res.residuals > 0).all())


def test_nan_operator_raises() -> None:
    op = FunctionOperator(lambda V: torch.full_like(V, float("nan")), 10, torch.float64, "cpu")
    for solver in (lanczos, power_iteration):
        with pytest.raises(FloatingPointError, match="NaN"):
            solver(op, 1)


# ---- models against dense Hessians ----------------------------------------------------------

def model_cases() -> list[tuple[str, nn.Module, nn.Module, tuple[Tensor, Tensor]]]:
    x, _ = regression_data(n=25, d=3)
    return [
        ("mlp", mlp(), CE, classification_data()),
        ("cnn", cnn(), CE, classification_data(n=20, shape=(1, 6, 6))),
        ("deep_linear", deep_linear(), nn.MSELoss(), (x, torch.randn(25, 2, dtype=torch.float64, generator=gen(9)))),
    ]


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("case", model_cases(), ids=lambda c: c[0])
def test_top_eigenvalues_match_dense_eigvalsh(case, method) -> None:
    _, model, loss_fn, (x, y) = case
    H = dense_hessian(model, loss_fn, x, y)
    ev = torch.linalg.eigvalsh(H).flip(0)
    k, tol = 3, 1e-6
    res = nt.top_eigenvalues(model, loss_fn, (x, y), k=k, tol=tol, method=method, max_hvp=3000)
    assert res.converged and res.method == method
    # the stopping rule guarantees (an estimate of) |λ̂ − λ| ≤ tol·|λ|
    assert bool(((res.values - ev[:k]).abs() <= tol * ev[:k].abs()).all()), (res.values, ev[:k])
    v0 = torch.cat([t.reshape(-1) for t in res.vectors[0].values()])
    torch.testing.assert_close(H @ v0, res.values[0] * v0, rtol=0, atol=10 * float(res.residuals[0]) + 1e-12)


def test_linear_regression_spectrum_with_multiplicity_o() -> None:
    # H = (2/(N o)) I_o ⊗ XᵀX: every eigenvalue of 2XᵀX/(N o) appears o = 2 times.
    x, y = regression_data(n=30, d=4, o=2)
    model = nn.Linear(4, 2, bias=False).double()
    single = torch.linalg.eigvalsh(2 * x.T @ x / (30 * 2)).flip(0)
    res = nt.top_eigenvalues(model, nn.MSELoss(), (x, y), k=4, tol=1e-10)
    torch.testing.assert_close(res.values, single[[0, 0, 1, 1]], rtol=1e-9, atol=0)


def test_preconditioned_spectrum_matches_dense() -> None:
    model = mlp()
    x, y = classification_data()
    H = dense_hessian(model, CE, x, y)
    g = gen(7)
    lam = {n: torch.rand(p.shape, dtype=torch.float64, generator=g) + 0.1 for n, p in model.named_parameters()}
    lam["2.bias"] = torch.tensor(0.5, dtype=torch.float64)  # a scalar block broadcasts
    d = torch.cat([torch.broadcast_to(lam[n], p.shape).reshape(-1) for n, p in model.named_parameters()]).sqrt()
    ev = torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)

    class Precond:  # what nt.preconditioner_from returns: an object with .diag
        diag = lam

    for pre in (lam, Precond()):
        res = nt.top_eigenvalues(model, CE, (x, y), k=2, tol=1e-8, preconditioner=pre)
        assert res.preconditioned
        torch.testing.assert_close(res.values, ev[:2], rtol=1e-7, atol=0)
    bad = dict(lam)
    bad.pop("0.weight")
    with pytest.raises(ValueError, match="no entry"):
        nt.top_eigenvalues(model, CE, (x, y), preconditioner=bad)
    with pytest.raises(ValueError, match=">= 0"):
        nt.top_eigenvalues(model, CE, (x, y), preconditioner={**lam, "0.bias": -torch.ones(6)})
    with pytest.raises(ValueError, match="broadcastable"):
        nt.top_eigenvalues(model, CE, (x, y), preconditioner={**lam, "0.bias": torch.ones(7)})


def test_param_filter_gives_per_layer_curvature() -> None:
    model = mlp()
    x, y = classification_data()
    names = ["0.weight", "0.bias"]
    ev = torch.linalg.eigvalsh(dense_hessian(model, CE, x, y, names=names)).flip(0)
    res = nt.top_eigenvalues(model, CE, (x, y), k=2, tol=1e-8, param_filter="0")
    torch.testing.assert_close(res.values, ev[:2], rtol=1e-7, atol=0)
    assert list(res.vectors[0]) == names


def test_microbatched_and_other_hvp_methods_give_the_same_spectrum() -> None:
    model = mlp()
    x, y = classification_data(n=23)
    ref = nt.top_eigenvalues(model, CE, (x, y), k=2, tol=1e-8).values
    for kw in ({"microbatch_size": 5}, {"hvp_method": "forward_over_reverse"},
               {"hvp_method": "finite_difference"}):
        res = nt.top_eigenvalues(model, CE, (x, y), k=2, tol=1e-8, **kw)
        torch.testing.assert_close(res.values, ref, rtol=1e-7, atol=0)


def test_eigen_bad_input() -> None:
    model = mlp()
    x, y = classification_data()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="k="):
        nt.top_eigenvalues(model, CE, (x, y), k=n)
    with pytest.raises(ValueError, match="k"):
        nt.top_eigenvalues(model, CE, (x, y), k=0)
    for tol in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="tol"):
            nt.top_eigenvalues(model, CE, (x, y), tol=tol)
    with pytest.raises(ValueError, match="empty"):
        nt.top_eigenvalues(model, CE, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="param_filter"):
        nt.top_eigenvalues(model, CE, (x, y), param_filter=lambda name, p: False)
    with pytest.raises(ValueError, match="method"):
        nt.top_eigenvalues(model, CE, (x, y), method="arnoldi")
    with pytest.raises(ValueError, match="max_hvp"):
        nt.top_eigenvalues(model, CE, (x, y), k=3, max_hvp=2)


def test_model_non_convergence_warns_with_residuals() -> None:
    model = mlp()
    x, y = classification_data()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = nt.top_eigenvalues(model, CE, (x, y), k=2, tol=1e-14, max_hvp=4)
    assert any(issubclass(w.category, ConvergenceWarning) for w in rec)
    assert not res.converged and res.n_hvp <= 4
    assert res.residuals.shape == (2,) and bool(torch.isfinite(res.residuals).all())
