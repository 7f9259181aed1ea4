"""gradient_noise: the stated estimators against explicit per-sample gradients, and Tr Σ against
its closed form on linear regression (statistical checks with tolerances from the theory)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn

from _helpers import DT, per_sample_grads
from neurothermo.gradstats import GradientNoise, gradient_noise

RTOL = 1e-10  # float64, same formulas evaluated two ways: rounding only


def by_hand(g: Tensor, sizes: list[int]) -> dict[str, float]:
    """The documented estimators, written out from per-sample gradients g [N, P]."""
    n = g.shape[0]
    tk, w = [], []
    for part in torch.split(g, sizes):
        b = part.shape[0]
        tk.append(float((part - part.mean(0)).square().sum() / (b - 1)))
        w.append(b - 1)
    trace = sum(wi * ti for wi, ti in zip(w, tk)) / sum(w)
    k = len(tk)
    se = (math.sqrt(k / (k - 1) * sum((wi * (ti - trace)) ** 2 for wi, ti in zip(w, tk)))
          / sum(w)) if k > 1 else math.inf
    sq = g.square().sum(1)
    gbar = g.mean(0)
    return {
        "trace_sigma": trace, "trace_sigma_se": se, "mean_grad_sq_norm": float(sq.mean()),
        "mean_grad_sq_norm_se": float(sq.std() / math.sqrt(n)),
        "grad_norm_sq": float(gbar.square().sum()),
        "trace_sigma_population": float((g - gbar).square().sum(1).mean()),
    }


def check(res: GradientNoise, ref: dict[str, float]) -> None:
    for key, want in ref.items():
        got = getattr(res, key)
        if math.isinf(want):
            assert math.isinf(got), key
        else:
            assert got == pytest.approx(want, rel=RTOL, abs=1e-14), key


@pytest.mark.parametrize(("n", "batch_size", "sizes"),
                         [(12, 4, [4, 4, 4]), (14, 4, [5, 5, 4]), (9, 9, [9])])
def test_estimators_match_explicit_per_sample_gradients(n, batch_size, sizes) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(n, 3, dtype=DT), torch.randint(0, 2, (n,))
    loss_fn = nn.CrossEntropyLoss()
    res = gradient_noise(model, loss_fn, (x, y), batch_size=batch_size, by_parameter=True)
    grads = per_sample_grads(model, loss_fn, x, y)
    check(res, by_hand(torch.cat(list(grads.values()), 1), sizes))
    assert (res.n_samples, res.n_batches, res.batch_size) == (n, len(sizes), min(sizes))
    assert res.per_parameter is not None and list(res.per_parameter) == list(grads)
    for name, g in grads.items():
        check(res.per_parameter[name], by_hand(g, sizes))
    for key in ("trace_sigma", "mean_grad_sq_norm", "grad_norm_sq", "trace_sigma_population"):
        parts = sum(getattr(p, key) for p in res.per_parameter.values())
        assert parts == pytest.approx(getattr(res, key), rel=RTOL)


def test_single_batch_relations() -> None:
    """One batch: trace_sigma = N/(N−1) · population trace exactly, and no spread → se = inf."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT)
    res = gradient_noise(model, nn.MSELoss(), (x, y), batch_size=10)
    assert res.trace_sigma == pytest.approx(10 / 9 * res.trace_sigma_population, rel=RTOL)
    assert res.trace_sigma_population == pytest.approx(
        res.mean_grad_sq_norm - res.grad_norm_sq, rel=RTOL)
    assert math.isinf(res.trace_sigma_se) and res.per_parameter is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.trace_sigma = 0.0  # type: ignore[misc]


def _regression(n: int, d: int, sigma: float, r: Tensor, gen: torch.Generator
                ) -> tuple[nn.Module, Tensor, Tensor]:
    """f = w·x with w = v + r, x ~ N(0, I_d), y = v·x + σε; MSE loss l = (f − y)²."""
    v = torch.linspace(-1, 1, d, dtype=DT)
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_((v + r).unsqueeze(0))
    x = torch.randn(n, d, dtype=DT, generator=gen)
    y = (x @ v + sigma * torch.randn(n, dtype=DT, generator=gen)).unsqueeze(1)
    return model, x, y


def _true_trace(d: int, sigma: float, r: Tensor) -> float:
    # g = 2x(xᵀr − σε): E g = 2r, E‖g‖² = 4[(d+2)‖r‖² + dσ²]  ⇒  Tr Σ = 4[(d+1)‖r‖² + dσ²]
    return 4 * ((d + 1) * float(r.square().sum()) + d * sigma**2)


def test_trace_sigma_matches_closed_form_on_linear_regression() -> None:
    gen = torch.Generator().manual_seed(3)
    d, sigma = 4, 0.5
    r = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=DT)
    model, x, y = _regression(4000, d, sigma, r, gen)
    res = gradient_noise(model, nn.MSELoss(), (x, y), batch_size=50)
    truth = _true_trace(d, sigma, r)
    # The estimator is unbiased and se is its standard error: a 4-se band fails with p ≈ 6e-5.
    assert abs(res.trace_sigma - truth) < 4 * res.trace_sigma_se
    assert res.trace_sigma_se < 0.1 * truth  # and the test has power: se is a few % of Tr Σ
    assert abs(res.grad_norm_sq - 4 * float(r.square().sum())) < 0.1 * truth  # ‖E g‖² = 4‖r‖²


def test_standard_error_is_calibrated_across_independent_datasets() -> None:
    gen = torch.Generator().manual_seed(4)
    d, sigma = 3, 1.0
    r = torch.tensor([0.5, 0.0, -0.5], dtype=DT)
    truth = _true_trace(d, sigma, r)
    reps = 40
    est, se = [], []
    for _ in range(reps):
        model, x, y = _regression(400, d, sigma, r, gen)
        res = gradient_noise(model, nn.MSELoss(), (x, y), batch_size=20)
        est.append(res.trace_sigma)
        se.append(res.trace_sigma_se)
    spread = torch.tensor(est, dtype=DT).std().item()
    # Unbiased: the mean of 40 estimates lies within 4 of its standard errors of the truth.
    assert abs(sum(est) / reps - truth) < 4 * spread / math.sqrt(reps)
    # Calibrated: the typical reported se equals the actual spread of the estimates. The sample sd
    # of 40 near-normal estimates (each a mean over 400 samples) has relative standard error
    # 1/√(2·39) ≈ 0.11, the rms of 40 se's much less: [0.7, 1.4] is ≈ ±3 of that, and a se that
    # is off by 1.5× either way falls outside.
    rms_se = math.sqrt(sum(s * s for s in se) / reps)
    assert 0.7 < rms_se / spread < 1.4


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"batch_size": 1}, ValueError, "batch_size must be >= 2"),
        ({"batch_size": 11}, ValueError, "<= 10"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        ({"batch_size": 2, "data": (torch.randn(1, 3, dtype=DT), torch.randn(1, 2, dtype=DT))},
         ValueError, "at least 2"),
        ({"batch_size": 2, "data": (torch.randn(4, 3, dtype=DT), torch.randn(3, 2, dtype=DT))},
         ValueError, "disagree on the batch size"),
        ({"batch_size": 2, "loss_fn": nn.MSELoss(reduction="sum")}, ValueError, "reduction"),
    ],
    ids=["bs1", "bs-too-big", "bs-float", "one-sample", "mismatched", "sum-loss"],
)
def test_bad_input(kwargs, exc, match) -> None:
    args = {"data": (torch.randn(10, 3, dtype=DT), torch.randn(10, 2, dtype=DT)),
            "loss_fn": nn.MSELoss(), **kwargs}
    data, loss_fn = args.pop("data"), args.pop("loss_fn")
    with pytest.raises(exc, match=match):
        gradient_noise(nn.Linear(3, 2).to(DT), loss_fn, data, **args)


def test_non_finite_parameters_and_batchnorm_in_train_mode() -> None:
    data = (torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT))
    model = nn.Linear(3, 2).to(DT)
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="'weight'"):
        gradient_noise(model, nn.MSELoss(), data, batch_size=3)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    with pytest.raises(ValueError, match="model.eval()"):
        gradient_noise(bn, nn.MSELoss(), data, batch_size=3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    res = gradient_noise(bn.eval(), nn.MSELoss(), data, batch_size=3)
    assert math.isfinite(res.trace_sigma)
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())
