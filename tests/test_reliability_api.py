"""Bad input to the measuring API gets a clear error (issue cases that used to slip through)."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurothermo as nt
from neurothermo._validate import check_loss_fn, check_mean_reduction, check_positive
from neurothermo.alignment import AlignmentWarning, cknna, cycle_knn, mutual_knn


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, generator=g), torch.randint(0, 3, (b,), generator=g)


@pytest.mark.parametrize("value", [True, False])
def test_bool_learning_rate_is_refused(value: bool) -> None:
    with pytest.raises(TypeError, match="lr must be a number, got the bool"):
        check_positive("lr", value)
    with pytest.raises(TypeError, match="lr must be a number"):
        nt.entropic_loss(_mlp(), nn.CrossEntropyLoss(), _batch(), lr=value)


@pytest.mark.parametrize("loss_fn", [
    functools.partial(F.cross_entropy, reduction="sum"),
    functools.partial(functools.partial(F.cross_entropy, label_smoothing=0.1), reduction="none"),
])
def test_partial_with_a_non_mean_reduction_is_refused(loss_fn) -> None:
    with pytest.raises(ValueError, match="expects a mean-reduced loss"):
        check_loss_fn(loss_fn)
    with pytest.raises(ValueError, match="expects a mean-reduced loss"):
        nt.per_sample_grad_norms(_mlp(), loss_fn, _batch())
    with pytest.raises(ValueError, match="expects a mean-reduced loss"):
        nt.gradient_noise(_mlp(), loss_fn, _batch(16), batch_size=4)
    check_loss_fn(functools.partial(F.cross_entropy, reduction="mean"))  # fine


def test_probe_sees_a_sum_hidden_in_a_plain_function() -> None:
    model, (x, y) = _mlp(), _batch()
    out = model(x)

    def summed(o, t):
        return F.cross_entropy(o, t, reduction="sum")

    with pytest.raises(ValueError, match="sums over the batch"):
        check_mean_reduction(summed, out, y, summed(out, y))
    check_mean_reduction(F.cross_entropy, out, y, F.cross_entropy(out, y))  # the mean passes
    zero = torch.zeros(())
    check_mean_reduction(summed, out, y, zero)  # ~0 loss: the probe cannot tell, so it is silent


def test_meta_device_model_is_refused_with_the_way_out() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = _batch()
    calls = [
        lambda: nt.entropic_loss(model, nn.CrossEntropyLoss(), (x, y), lr=0.1),
        lambda: nt.entropic_force(model, nn.CrossEntropyLoss(), (x, y), lr=0.1),
        lambda: nt.per_sample_grad_norms(model, nn.CrossEntropyLoss(), (x, y)),
        lambda: nt.top_eigenvalues(model, nn.CrossEntropyLoss(), (x, y), k=1),
        lambda: nt.train(model, nn.CrossEntropyLoss(), (x, y), lr=0.1, batch_size=4, steps=1),
    ]
    for call in calls:
        with pytest.raises((ValueError, RuntimeError), match="meta"):
            call()


def test_knn_metrics_refuse_constant_features_like_cka() -> None:
    g = torch.Generator().manual_seed(0)
    varied = torch.randn(30, 5, generator=g)
    const = torch.ones(30, 5)
    for metric in (mutual_knn, cycle_knn, cknna, nt.alignment.cka):
        for a, b in ((const, varied), (varied, const), (const, const)):
            with pytest.raises(ValueError, match="constant across samples"):
                metric(a, b)
    # rows that are positive multiples of one vector are constant after the cosine normalisation
    scaled = torch.rand(30, 1, generator=g) + 0.5
    with pytest.raises(ValueError, match="constant across samples"):
        mutual_knn(scaled * torch.ones(1, 5), varied)
    assert 0 <= mutual_knn(scaled * torch.ones(1, 5), varied, normalize=False) <= 1


def test_unbiased_cknna_outside_unit_interval_warns() -> None:
    # Found by a search over small inputs with duplicated rows: 6 distinct rows repeated 3 times,
    # the second view perturbed by 1e-3, k = 3, gives unbiased CKNNA ≈ 1.045.
    g = torch.Generator().manual_seed(72)
    n = int(torch.randint(6, 30, (1,), generator=g))
    base = torch.randn(n, 4, generator=g)
    r = int(torch.randint(2, 4, (1,), generator=g))
    dup = base.repeat(r, 1)
    torch.randn(dup.shape, generator=g)  # the search drew (and discarded) the eps=0 noise first
    torch.randn(dup.shape, generator=g)  # and the eps=1e-6 one
    other = dup + 1e-3 * torch.randn(dup.shape, generator=g)
    with pytest.warns(AlignmentWarning, match="outside \\[-1, 1\\].*not positive semi-definite"):
        v = cknna(dup, other, k=3)
    assert v > 1
    near = base.repeat(2, 1) + 0.01 * torch.randn(2 * n, 4, generator=g)
    with pytest.warns(AlignmentWarning):  # the biased estimator is not bounded either (≈ 1.049)
        assert cknna(near, dup[:2 * n], k=3, unbiased=False) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary value gives no warning
        x = torch.randn(40, 4, generator=g)
        assert abs(cknna(x, x + 0.3 * torch.randn(40, 4, generator=g), k=3)) <= 1


def test_find_symmetries_refuses_non_finite_inputs_and_weights() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert len(nt.find_symmetries(model, x)) > 0  # finite: found
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="example input 0 contains NaN or Inf"):
        nt.find_symmetries(model, bad)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="parameter '0.weight' contains NaN or Inf"):
        nt.find_symmetries(model, x)
