"""Trace estimators: unbiased over many seeds on explicit matrices, standard errors calibrated."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import classification_data, dense_hessian, mlp, regression_data
from neurothermo.curvature import DenseOperator, hutchinson, hutchpp

CE = nn.CrossEntropyLoss()
SEEDS = 300


def explicit_matrix() -> torch.Tensor:
    """Symmetric, indefinite, with a decaying spectrum and non-trivial off-diagonal mass."""
    g = torch.Generator().manual_seed(0)
    n = 40
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    ev = 10.0 * 0.7 ** torch.arange(n, dtype=torch.float64) - 0.3
    return Q @ torch.diag(ev) @ Q.T


def run(estimator, A: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    est, se = [], []
    for s in range(SEEDS):
        r = estimator(DenseOperator(A), m, generator=torch.Generator().manual_seed(s))
        assert r.n_hvp == m
        est.append(r.estimate)
        se.append(r.stderr)
    return torch.tensor(est, dtype=torch.float64), torch.tensor(se, dtype=torch.float64)


def test_hutchinson_unbiased_with_theoretical_variance() -> None:
    # Rademacher: Var[zᵀAz] = 2(‖A‖_F² − Σ A_ii²). With m probes and S seeds, the mean of the S
    # estimates has standard deviation sqrt(Var/(m S)); 4 of them is a 6e-5 two-sided tail.
    A = explicit_matrix()
    m = 8
    var = 2 * (A.pow(2).sum() - A.diagonal().pow(2).sum())
    est, se = run(hutchinson, A, m)
    assert abs(float(est.mean() - A.trace())) <= 4 * math.sqrt(float(var) / (m * SEEDS))
    # reported stderr² is an unbiased estimate of Var/m: compare its mean with 4 of its own SEs
    se2 = se.pow(2)
    assert abs(float(se2.mean()) - float(var) / m) <= 4 * float(se2.std()) / math.sqrt(SEEDS)


def test_hutchpp_unbiased_and_stderr_calibrated() -> None:
    # Hutch++ has no simple closed-form variance: use the spread over seeds (4 standard errors).
    # Its stderr is conditional on the sketch Q, whose term is exact, so E[stderr²] = Var[estimate].
    A = explicit_matrix()
    m = 12
    est, se = run(hutchpp, A, m)
    assert abs(float(est.mean() - A.trace())) <= 4 * float(est.std()) / math.sqrt(SEEDS)
    se2 = se.pow(2)
    # SE of the sample variance ≈ var·sqrt(2/(S−1)) (normal approximation), plus the SE of mean(se²)
    tol = 4 * (float(est.var()) * math.sqrt(2 / (SEEDS - 1)) + float(se2.std()) / math.sqrt(SEEDS))
    assert abs(float(se2.mean()) - float(est.var())) <= tol
    # and it beats Hutchinson at the same budget on a decaying spectrum (variance ~1/m² vs 1/m)
    est_h, _ = run(hutchinson, A, m)
    assert float(est.var()) < 0.5 * float(est_h.var())


def test_hutchpp_exact_when_sketch_spans_the_range() -> None:
    # rank-3 PSD matrix and a sketch of 4 vectors: tr(QᵀAQ) is the whole trace, the rest is 0
    g = torch.Generator().manual_seed(1)
    B = torch.randn(30, 3, dtype=torch.float64, generator=g)
    A = B @ B.T
    r = hutchpp(DenseOperator(A), 12, generator=g)
    assert abs(r.estimate - float(A.trace())) <= 1e-10 * float(A.trace())
    assert r.stderr <= 1e-10 * float(A.trace())


def test_hessian_trace_linear_regression_closed_form() -> None:
    # tr H = tr((2/(N o)) I_o ⊗ XᵀX) = 2‖X‖_F²/N for MSELoss (mean over N and o)
    x, y = regression_data(n=30, d=3, o=2)
    model = nn.Linear(3, 2, bias=False).double()
    exact = float(2 * x.pow(2).sum() / 30)
    r = nt.hessian_trace(model, nn.MSELoss(), (x, y), n_samples=200)
    assert abs(r.estimate - exact) <= 4 * r.stderr
    # Hutch++ with a sketch of 6 ≥ n = 6 parameters is exact
    r = nt.hessian_trace(model, nn.MSELoss(), (x, y), n_samples=18, method="hutch++")
    assert abs(r.estimate - exact) <= 1e-10 * exact and r.n_hvp == 18


def test_hessian_trace_of_mlp_and_per_layer() -> None:
    model = mlp()
    x, y = classification_data()
    H = dense_hessian(model, CE, x, y)
    for method in ("hutchinson", "hutch++"):
        r = nt.hessian_trace(model, CE, (x, y), n_samples=150, method=method)
        assert abs(r.estimate - float(H.trace())) <= 4 * r.stderr, (method, r)
    H2 = dense_hessian(model, CE, x, y, names=["2.weight", "2.bias"])
    r = nt.hessian_trace(model, CE, (x, y), n_samples=150, param_filter="2")
    assert abs(r.estimate - float(H2.trace())) <= 4 * r.stderr


def test_trace_bad_input() -> None:
    model = mlp()
    x, y = classification_data()
    with pytest.raises(ValueError, match="n_samples"):
        nt.hessian_trace(model, CE, (x, y), n_samples=1)
    with pytest.raises(ValueError, match="n_samples"):
        nt.hessian_trace(model, CE, (x, y), n_samples=3, method="hutch++")
    with pytest.raises(ValueError, match="method"):
        nt.hessian_trace(model, CE, (x, y), n_samples=10, method="slq")
    with pytest.raises(ValueError, match="empty"):
        nt.hessian_trace(model, CE, (x[:0], y[:0]), n_samples=10)
    with pytest.raises(ValueError, match="param_filter"):
        nt.hessian_trace(model, CE, (x, y), n_samples=10, param_filter=["nothing"])
