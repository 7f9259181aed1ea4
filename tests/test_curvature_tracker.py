"""SharpnessTracker: warm starts, agreement with cold Lanczos and dense Hessians, stability numbers."""
from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import neurothermo as nt
from test_curvature_reference import classification_data, dense_hessian, mlp

CE = nn.CrossEntropyLoss()


def test_reading_matches_dense_and_reports_stability_numbers() -> None:
    model = mlp()
    x, y = classification_data()
    ev = torch.linalg.eigvalsh(dense_hessian(model, CE, x, y)).flip(0)
    tracker = nt.SharpnessTracker(k=2, tol=1e-8, lr=0.3, momentum=0.9)
    r = tracker.update(model, CE, (x, y), step=17)
    torch.testing.assert_close(r.values, ev[:2], rtol=1e-7, atol=0)
    assert r.step == 17 and not r.warm_started and r.converged
    assert r.lambda_max == pytest.approx(float(ev[0]), rel=1e-7)
    assert r.lr_lambda_max == pytest.approx(0.3 * r.lambda_max)
    assert r.stability_limit == pytest.approx(2 * (1 + 0.9))  # heavy ball: η λ < 2(1 + β)
    assert r.edge_ratio == pytest.approx(0.3 * r.lambda_max / 3.8)
    # per-update overrides (lr schedules) and no lr at all
    r2 = tracker.update(model, CE, (x, y), lr=0.1, momentum=0.0)
    assert r2.stability_limit == 2.0 and r2.lr_lambda_max == pytest.approx(0.1 * r2.lambda_max)
    assert nt.SharpnessTracker().update(model, CE, (x, y)).lr_lambda_max is None


def test_warm_start_on_an_unchanged_model_is_cheaper_than_cold() -> None:
    # the start vector v1 + ½v2 (previous top Ritz vector plus the guard) spans {v1, v2} after two
    # products; certifying the pair to 1e-6 then takes a step or two, far fewer than from random
    model = mlp()
    x, y = classification_data()
    tracker = nt.SharpnessTracker(k=1, tol=1e-6)
    cold = tracker.update(model, CE, (x, y))
    warm = tracker.update(model, CE, (x, y))
    assert warm.warm_started and warm.converged
    assert 2 * warm.n_hvp <= cold.n_hvp
    assert warm.lambda_max == pytest.approx(cold.lambda_max, rel=2e-6)
    assert [r.step for r in tracker.history] == [0, 1]
    torch.testing.assert_close(tracker.values(), torch.tensor([cold.lambda_max, warm.lambda_max], dtype=torch.float64))


def test_warm_start_dropped_when_parameters_change_and_after_reset() -> None:
    model = mlp()
    x, y = classification_data()
    tracker = nt.SharpnessTracker()
    tracker.update(model, CE, (x, y))
    assert not tracker.update(model, CE, (x, y), preconditioner={n: torch.ones(()) for n, _ in model.named_parameters()}).warm_started
    assert nt.SharpnessTracker(param_filter="2").update(model, CE, (x, y)).values.numel() == 1
    tracker.update(model, CE, (x, y))
    tracker.reset()
    assert not tracker.update(model, CE, (x, y)).warm_started


def test_tracking_during_training_is_accurate_and_cheap() -> None:
    # MLP on real digits, SGD; sharpness on a fixed 256-example subset every 3 steps. Each warm
    # update must agree with a cold Lanczos run (both stop at relative error estimate 1e-3, so they
    # may differ by up to ~2e-3) and cost ≤ 10 products whenever λ_max moved < 5% (issue 7's goal).
    X, Y = load_digits(return_X_y=True)
    X = torch.tensor(X[:600], dtype=torch.float32) / 16
    Y = torch.tensor(Y[:600])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fixed = (X[:256], Y[:256])
    tracker = nt.SharpnessTracker(lr=0.1)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for step in range(60):
        idx = torch.randint(0, 600, (64,), generator=g)
        opt.zero_grad()
        CE(model(X[idx]), Y[idx]).backward()
        opt.step()
        if step % 3 == 2:
            prev = tracker.history[-1].lambda_max if tracker.history else None
            r = tracker.update(model, CE, fixed, step=step)
            cold = nt.top_eigenvalues(model, CE, fixed)
            assert r.converged
            assert abs(r.lambda_max - cold.lambda_max) <= 2e-3 * cold.lambda_max
            if prev is not None and abs(r.lambda_max - prev) < 0.05 * prev:
                assert r.n_hvp <= 10, (step, r.n_hvp)
                checked += 1
    assert checked >= 10  # the < 5% condition was actually exercised


def test_tracker_bad_input() -> None:
    with pytest.raises(ValueError, match="momentum"):
        nt.SharpnessTracker(momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        nt.SharpnessTracker(lr=0.0)
    with pytest.raises(ValueError, match="k"):
        nt.SharpnessTracker(k=0)
    with pytest.raises(ValueError, match="tol"):
        nt.SharpnessTracker(tol=-1.0)
    with pytest.raises(ValueError, match="mode"):
        nt.SharpnessTracker(mode="inference")
    with pytest.raises(ValueError, match="method"):
        nt.SharpnessTracker(method="eigh")
    model = mlp()
    x, y = classification_data()
    with pytest.raises(ValueError, match="empty"):
        nt.SharpnessTracker().update(model, CE, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="momentum"):
        nt.SharpnessTracker().update(model, CE, (x, y), momentum=-0.1)
