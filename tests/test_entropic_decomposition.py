"""E_B φ = L + (η/4)‖∇L‖² + (η/4)Tr Σ_B and its force, against exact enumeration of minibatches,
a Monte-Carlo average (docs/theory.md §1 check (d)) and a naive loop of per-sample Hessian products."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

import neurothermo as nt
from _helpers import (
    DT,
    dense_grad_hessian,
    flat,
    naive_per_sample_hg,
    objective,
    params_of,
    regression_data,
    tiny_regressor,
)

LR = 0.3


def batches(n: int, b: int, replacement: bool) -> list[tuple[int, ...]]:
    """Every minibatch, each equally likely: ordered b-tuples (with) or b-subsets (without)."""
    if replacement:
        return list(itertools.product(range(n), repeat=b))
    return list(itertools.combinations(range(n), b))


def phi_and_sq(model: nn.Module, x: Tensor, y: Tensor, idx: tuple[int, ...] | Tensor,
               wd: float) -> tuple[float, float]:
    """``φ_B = l_B + (wd/2)‖θ‖² + (η/4)‖g_B‖²`` and ``‖g_B‖²`` of one minibatch, by autograd."""
    sel = torch.as_tensor(idx)
    f = objective(model, nn.MSELoss(), x[sel], y[sel], wd)
    leaves = {k: v.requires_grad_(True) for k, v in params_of(model).items()}
    value = f(leaves)
    sq = sum(float((g * g).sum()) for g in torch.autograd.grad(value, list(leaves.values())))
    return float(value.detach()) + LR / 4 * sq, sq


def trace_sigma_reference(model: nn.Module, x: Tensor, y: Tensor) -> float:
    p = params_of(model)
    gs = torch.stack([dense_grad_hessian(objective(model, nn.MSELoss(), x[i:i + 1], y[i:i + 1]), p)[0]
                      for i in range(x.shape[0])])
    return float((gs * gs).sum(1).mean() - (gs.mean(0) ** 2).sum())


@pytest.mark.parametrize(("replacement", "b", "wd"), [(True, 2, 0.0), (True, 3, 0.1),
                                                        (False, 2, 0.0), (False, 3, 0.1)])
def test_decomposition_equals_exact_average_over_all_minibatches(replacement: bool, b: int,
                                                                 wd: float) -> None:
    model = tiny_regressor()
    x, y = regression_data(5, seed=1)
    dec = nt.entropic_decomposition(model, nn.MSELoss(), (x, y), lr=LR, batch_size=b,
                                    replacement=replacement, weight_decay=wd)
    vals = [phi_and_sq(model, x, y, idx, wd) for idx in batches(5, b, replacement)]
    expected_phi = sum(v for v, _ in vals) / len(vals)
    expected_sq = sum(s for _, s in vals) / len(vals)
    assert dec.total == pytest.approx(expected_phi, rel=1e-12)
    assert dec.discretization + dec.noise == pytest.approx(LR / 4 * expected_sq, rel=1e-12)
    assert dec.total == pytest.approx(dec.loss + dec.discretization + dec.noise, rel=1e-14)
    full_phi, full_sq = phi_and_sq(model, x, y, tuple(range(5)), wd)
    assert dec.grad_norm_sq == pytest.approx(full_sq, rel=1e-12)
    assert dec.loss == pytest.approx(full_phi - LR / 4 * full_sq, rel=1e-12)
    tr = trace_sigma_reference(model, x, y)
    assert dec.trace_sigma == pytest.approx(tr, rel=1e-12)
    factor = 1 / b if replacement else (5 - b) / (b * 4)
    assert dec.trace_sigma_batch == pytest.approx(tr * factor, rel=1e-12)
    assert dec.temperature == LR / b


def test_full_batch_without_replacement_has_no_noise_and_chunks_do_not_matter() -> None:
    model = tiny_regressor()
    x, y = regression_data(9, seed=1)
    full = nt.entropic_decomposition(model, nn.MSELoss(), (x, y), lr=LR, batch_size=9,
                                     replacement=False)
    assert full.noise == 0.0
    one = nt.entropic_decomposition(model, nn.MSELoss(), (x, y), lr=LR, batch_size=2)
    chunked = nt.entropic_decomposition(model, nn.MSELoss(), (x, y), lr=LR, batch_size=2,
                                        chunk_size=4)
    for field in ("loss", "discretization", "noise", "trace_sigma"):
        assert getattr(chunked, field) == pytest.approx(getattr(one, field), rel=1e-12)
    # with replacement the noise is Tr Σ / b
    four = nt.entropic_decomposition(model, nn.MSELoss(), (x, y), lr=LR, batch_size=4)
    assert four.noise == pytest.approx(one.noise / 2, rel=1e-12)


@pytest.mark.parametrize("replacement", [True, False])
def test_monte_carlo_over_minibatches_reproduces_the_decomposition(replacement: bool) -> None:
    """Check (d): the mean of φ_B and of ‖g_B‖² over K random minibatches (fixed seed).

    Each minibatch's ``l_B`` and ``g_B`` are averages of per-sample losses and gradients (computed
    once, by autograd, one sample at a time). The tolerance is 4 Monte-Carlo standard errors
    (std/√K): a correct implementation fails with probability < 1e-4 per quantity; a wrong batch
    factor (1/b instead of (N−b)/(b(N−1)), 16/19 of it here) shifts the noise by > 10 of them.
    """
    model = tiny_regressor(1)
    n, b, k = 20, 4, 20000
    x, y = regression_data(n, seed=4)
    dec = nt.entropic_decomposition(model, nn.MSELoss(), (x, y), lr=LR, batch_size=b,
                                    replacement=replacement)
    p = params_of(model)
    per = [dense_grad_hessian(objective(model, nn.MSELoss(), x[i:i + 1], y[i:i + 1]), p)[0]
           for i in range(n)]
    grads_i = torch.stack(per)
    losses_i = torch.stack([objective(model, nn.MSELoss(), x[i:i + 1], y[i:i + 1])(p)
                            for i in range(n)]).detach()
    gen = torch.Generator().manual_seed(7)
    if replacement:
        idx = torch.randint(0, n, (k, b), generator=gen)
    else:
        idx = torch.argsort(torch.rand(k, n, generator=gen, dtype=DT), dim=1)[:, :b]
    g_b = grads_i[idx].mean(1)
    sq = (g_b * g_b).sum(1)
    phi = losses_i[idx].mean(1) + LR / 4 * sq
    se_phi, se_sq = float(phi.std()) / math.sqrt(k), float(sq.std()) / math.sqrt(k)
    assert abs(float(phi.mean()) - dec.total) < 4 * se_phi
    noise_mc = float(sq.mean()) - dec.grad_norm_sq
    assert abs(noise_mc - dec.trace_sigma_batch) < 4 * se_sq
    wrong = dec.trace_sigma / b if not replacement else dec.trace_sigma * (n - b) / (b * (n - 1))
    assert abs(noise_mc - wrong) > 10 * se_sq  # the test can tell the two conventions apart


@pytest.mark.parametrize(("replacement", "wd", "chunk"), [(True, 0.0, 512), (False, 0.0, 3),
                                                          (True, 0.1, 512), (False, 0.1, 4)])
def test_expected_force_matches_naive_per_sample_hessian_loop(replacement: bool, wd: float,
                                                              chunk: int) -> None:
    model = tiny_regressor(2)
    x, y = regression_data(10, seed=5)
    b = 3
    res = nt.expected_entropic_force(model, nn.MSELoss(), (x, y), lr=LR, batch_size=b,
                                     replacement=replacement, weight_decay=wd, chunk_size=chunk)
    g, h = dense_grad_hessian(objective(model, nn.MSELoss(), x, y, wd), params_of(model))
    torch.testing.assert_close(flat(res.discretization), -LR / 2 * h @ g)
    gbar, h_plain = dense_grad_hessian(objective(model, nn.MSELoss(), x, y), params_of(model))
    _, hg_i = naive_per_sample_hg(model, nn.MSELoss(), x, y)
    grad_trace = 2 * hg_i - 2 * h_plain @ gbar  # ∇Tr Σ = (2/N)Σ H_i g_i − 2Hḡ
    factor = 1 / b if replacement else (10 - b) / (b * 9)
    torch.testing.assert_close(flat(res.noise), -LR / 4 * factor * grad_trace)
    torch.testing.assert_close(flat(res.total), flat(res.discretization) + flat(res.noise))


def test_expected_force_is_the_average_of_minibatch_forces() -> None:
    """E_B[−(η/2)H_B g_B] over every minibatch = −(η/4)∇E_B‖g_B‖² (exact enumeration)."""
    model = tiny_regressor(3)
    x, y = regression_data(5, seed=6)
    for replacement in (True, False):
        res = nt.expected_entropic_force(model, nn.MSELoss(), (x, y), lr=LR, batch_size=2,
                                         replacement=replacement)
        all_b = batches(5, 2, replacement)
        mean = sum(flat(nt.entropic_force(model, nn.MSELoss(), (x[list(i)], y[list(i)]), lr=LR))
                   for i in all_b) / len(all_b)
        torch.testing.assert_close(flat(res.total), mean)


def test_classifier_decomposition_and_force_agree_with_each_other() -> None:
    """Cross-entropy model: the force is −∇ of the decomposition's correction terms (finite diff.)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=gen)
    data, b = (x, y), 4
    res = nt.expected_entropic_force(model, nn.CrossEntropyLoss(), data, lr=LR, batch_size=b)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in model.named_parameters()}
    eps = 1e-4

    def corrections(sign: float) -> float:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.add_(sign * eps * direction[k])
        d = nt.entropic_decomposition(model, nn.CrossEntropyLoss(), data, lr=LR, batch_size=b)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.sub_(sign * eps * direction[k])
        return d.discretization + d.noise

    fd = (corrections(1.0) - corrections(-1.0)) / (2 * eps)  # central difference: O(eps²) error
    assert -float(flat(res.total) @ flat(direction)) == pytest.approx(fd, rel=1e-6)


def test_float32_model_agrees_with_float64_to_single_precision() -> None:
    model = tiny_regressor(4)
    x, y = regression_data(16, seed=8)
    ref = nt.entropic_decomposition(model, nn.MSELoss(), (x, y), lr=LR, batch_size=4)
    model32 = model.float()
    dec = nt.entropic_decomposition(model32, nn.MSELoss(), (x.float(), y.float()), lr=LR,
                                    batch_size=4)
    # float32 rounding (~6e-8) amplified by ‖ḡ‖²/Tr Σ and the depth of the graph: 1e-5 is ample
    for field in ("loss", "discretization", "noise", "trace_sigma"):
        assert getattr(dec, field) == pytest.approx(getattr(ref, field), rel=1e-5)
    force = nt.expected_entropic_force(model32, nn.MSELoss(), (x.float(), y.float()), lr=LR,
                                       batch_size=4)
    assert all(t.dtype == torch.float32 for t in force.total.values())
