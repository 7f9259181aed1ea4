"""Hessian-vector products against dense float64 Hessians, closed forms and each other."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, jvp

import neurothermo as nt
from _helpers import (
    classification_data,
    cnn,
    deep_linear,
    dense_hessian,
    loss_of_flat,
    mlp,
    regression_data,
)
from neurothermo.curvature import hessian_operator

METHODS = ["reverse", "forward_over_reverse", "finite_difference"]
CE = nn.CrossEntropyLoss()


def mse(o: Tensor, t: Tensor) -> Tensor:
    return ((o - t) ** 2).mean()


def flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


def unit(n: int, seed: int = 0) -> Tensor:
    v = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def cases() -> list[tuple[str, nn.Module, nn.Module, tuple[Tensor, Tensor]]]:
    x_reg, _ = regression_data(n=25, d=3)
    return [
        ("mlp", mlp(), CE, classification_data()),
        ("cnn", cnn(), CE, classification_data(n=20, shape=(1, 6, 6))),
        ("deep_linear", deep_linear(), nn.MSELoss(), (x_reg, torch.randn(25, 2, dtype=torch.float64))),
    ]


@pytest.mark.parametrize("method", ["reverse", "forward_over_reverse"])
@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
def test_exact_methods_match_dense_hessian(case, method) -> None:
    _, model, loss_fn, (x, y) = case
    H = dense_hessian(model, loss_fn, x, y)
    v = unit(H.shape[0])
    hv = flat(nt.hvp(model, loss_fn, (x, y), v, method=method))
    # both are exact up to float64 rounding of O(n) sums
    torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
def test_finite_difference_error_is_its_own_truncation_term(case) -> None:
    # Central difference of g(t) = ∇L(θ + t v):  (g(h) − g(−h))/(2h) = g'(0) + (h²/6) g'''(0) + O(h⁴).
    # g'''(0) is computed exactly (three nested jvps), so after removing the h² term only O(h⁴)
    # (relative size ~ h² = 1e-4) and rounding (~1e-16/h) remain: 1% of the h² term is generous.
    _, model, loss_fn, (x, y) = case
    if isinstance(loss_fn, nn.MSELoss):  # torch's mse_loss has no third derivative by forward AD
        loss_fn = mse
    f, theta = loss_of_flat(model, loss_fn, x, y)
    v = unit(theta.numel(), seed=3)
    one = torch.ones((), dtype=torch.float64)

    def g(t: Tensor) -> Tensor:
        return grad(f)(theta + t * v)

    def d1(t: Tensor) -> Tensor:
        return jvp(g, (t,), (one,))[1]

    def d2(t: Tensor) -> Tensor:
        return jvp(d1, (t,), (one,))[1]

    hv = d1(torch.zeros((), dtype=torch.float64))
    third = jvp(d2, (torch.zeros((), dtype=torch.float64),), (one,))[1]
    h = 1e-2
    fd = flat(nt.hvp(model, loss_fn, (x, y), v, method="finite_difference", fd_step=h))
    leading = h**2 / 6 * third
    assert (fd - hv - leading).norm() <= 0.01 * leading.norm() + 1e-12
    # default step h = ε^{1/3}/‖v‖ balances truncation (∝ h²) and rounding (∝ ε/h): the total
    # relative error is O(ε^{2/3}) ≈ 4e-11 in float64; allow 100× for the O(1) constants.
    fd0 = flat(nt.hvp(model, loss_fn, (x, y), v, method="finite_difference"))
    assert (fd0 - hv).norm() <= 100 * torch.finfo(torch.float64).eps ** (2 / 3) * hv.norm()


@pytest.mark.parametrize("method", METHODS)
def test_microbatches_weighted_by_size_give_the_full_data_hessian(method) -> None:
    model = mlp()
    x, y = classification_data(n=23)
    H = dense_hessian(model, CE, x, y)
    v = unit(H.shape[0])
    rtol = 1e-9 if method != "finite_difference" else 1e-7
    # 23 = 7 + 7 + 7 + 2: unequal microbatches must be weighted by b_m/N, not 1/#microbatches
    for data, mb in [((x, y), 7), ([(x[:5], y[:5]), (x[5:], y[5:])], None), ([(x[:5], y[:5]), (x[5:], y[5:])], 4)]:
        hv = flat(nt.hvp(model, CE, data, v, method=method, microbatch_size=mb))
        torch.testing.assert_close(hv, H @ v, rtol=rtol, atol=1e-10)


def test_linear_regression_closed_form_and_dict_vector() -> None:
    # L = (1/(N o)) Σ ‖W x_i + c − y_i‖² (MSELoss, mean over N and o): H_WW v = (2/(N o)) V XᵀX,
    # H_cc = (2/o)·I/… : with bias, the augmented design [X, 1] gives H = (2/(N o)) I_o ⊗ X̃ᵀX̃.
    x, y = regression_data(n=30, d=3, o=2)
    model = nn.Linear(3, 2).double()
    vW = torch.randn(2, 3, dtype=torch.float64)
    vb = torch.randn(2, dtype=torch.float64)
    out = nt.hvp(model, nn.MSELoss(), (x, y), {"weight": vW, "bias": vb})
    xa = torch.cat([x, torch.ones(30, 1, dtype=torch.float64)], dim=1)
    va = torch.cat([vW, vb[:, None]], dim=1)
    expected = va @ (2 * xa.T @ xa / (30 * 2))
    torch.testing.assert_close(out["weight"], expected[:, :3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["bias"], expected[:, 3], rtol=1e-12, atol=1e-12)


def test_param_filter_gives_the_diagonal_block() -> None:
    model = mlp()
    x, y = classification_data()
    names = ["2.weight", "2.bias"]
    H = dense_hessian(model, CE, x, y, names=names)
    v = unit(H.shape[0])
    for filt in ["2", names, lambda n, p: n.startswith("2.")]:
        out = nt.hvp(model, CE, (x, y), v, param_filter=filt)
        assert list(out) == names
        torch.testing.assert_close(flat(out), H @ v, rtol=1e-10, atol=1e-12)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def bn_setup() -> tuple[BNNet, Tensor, Tensor]:
    torch.manual_seed(0)
    model = BNNet().double()
    x, y = classification_data(n=16, shape=(4,))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 1.0)  # non-trivial running statistics
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, x, y


def snapshot(model: nn.Module) -> tuple:
    return ({n: b.clone() for n, b in model.named_buffers()},
            {n: m.training for n, m in model.named_modules()},
            {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: m.track_running_stats for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)})


def assert_same(a: tuple, b: tuple) -> None:
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            if isinstance(da[k], Tensor):
                assert torch.equal(da[k], db[k]), k
            else:
                assert da[k] == db[k], k


@pytest.mark.parametrize("initially_training", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_state_is_restored_exactly(mode, initially_training) -> None:
    model, x, y = bn_setup()
    model.train(initially_training)
    before = snapshot(model)
    v = unit(sum(p.numel() for p in model.parameters()))
    for method in METHODS:
        nt.hvp(model, CE, (x, y), v, mode=mode, method=method)
    nt.top_eigenvalues(model, CE, (x, y), k=2, mode=mode)
    nt.hessian_trace(model, CE, (x, y), n_samples=4, mode=mode)
    nt.SharpnessTracker(mode=mode).update(model, CE, (x, y))
    assert_same(before, snapshot(model))


def test_train_mode_uses_batch_statistics_and_fixed_dropout_masks() -> None:
    model, x, y = bn_setup()
    model.drop.p = 0.0  # the reference below has no dropout
    ref = copy.deepcopy(model)

    def forward(p: dict[str, Tensor], xx: Tensor) -> Tensor:  # BatchNorm with batch statistics
        # written out: torch.func's batching rule for native batch_norm's double backward gives an
        # asymmetric (wrong) dense Hessian in torch 2.13, so the reference avoids that kernel
        h = xx @ p["fc1.weight"].T + p["fc1.bias"]
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + ref.bn.eps)
        h = h * p["bn.weight"] + p["bn.bias"]
        return torch.tanh(h) @ p["fc2.weight"].T + p["fc2.bias"]

    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

    def f(t: Tensor) -> Tensor:
        d = {n: c.view(s) for n, c, s in zip(names, t.split([s.numel() for s in shapes]), shapes)}
        return CE(forward(d, x), y)

    H = torch.func.hessian(f)(theta)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    v = unit(theta.numel())
    torch.testing.assert_close(flat(nt.hvp(model, CE, (x, y), v, mode="train")), H @ v, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(flat(nt.hvp(model, CE, (x, y), v, mode="eval")), H @ v)
    # with dropout active, train mode is still one fixed symmetric matrix: u·Hv = v·Hu, repeatable
    model.drop.p = 0.3
    u = unit(theta.numel(), seed=5)
    hv1 = flat(nt.hvp(model, CE, (x, y), v, mode="train", method="forward_over_reverse"))
    hv2 = flat(nt.hvp(model, CE, (x, y), v, mode="train"))
    hu = flat(nt.hvp(model, CE, (x, y), u, mode="train"))
    torch.testing.assert_close(hv1, hv2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u @ hv2, v @ hu, rtol=1e-10, atol=1e-12)


def test_train_mode_batchnorm_refuses_splitting_batches() -> None:
    model, x, y = bn_setup()
    v = unit(sum(p.numel() for p in model.parameters()))
    with pytest.raises(ValueError, match="BatchNorm"):
        nt.hvp(model, CE, (x, y), v, mode="train", microbatch_size=4)
    nt.hvp(model, CE, (x, y), v, mode="eval", microbatch_size=4)  # fine: eval uses running stats


def test_cached_graph_operator_counts_products_and_matches_uncached() -> None:
    model = mlp()
    x, y = classification_data()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    with hessian_operator(model, CE, (x, y)) as op:
        a = op.matmat(V)
        assert op.n_matvec == 3
    with hessian_operator(model, CE, (x, y), cache=False) as op:
        b = op.matmat(V)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_works_under_no_grad() -> None:
    model = mlp()
    x, y = classification_data()
    v = unit(sum(p.numel() for p in model.parameters()))
    ref = flat(nt.hvp(model, CE, (x, y), v))
    with torch.no_grad():
        torch.testing.assert_close(flat(nt.hvp(model, CE, (x, y), v)), ref, rtol=1e-12, atol=0)
        assert nt.top_eigenvalues(model, CE, (x, y)).converged


def test_loss_linear_in_parameters_has_zero_hessian() -> None:
    model = nn.Linear(3, 1).double()
    x, _ = regression_data(n=10, d=3, o=1)
    out = nt.hvp(model, lambda o, t: (o - t).mean(), (x, torch.zeros(10, 1, dtype=torch.float64)),
                 torch.ones(4, dtype=torch.float64))
    assert all(bool((t == 0).all()) for t in out.values())


# ---- bad input ------------------------------------------------------------------------------

def test_bad_input_errors_name_the_problem() -> None:
    model = mlp()
    x, y = classification_data()
    v = unit(sum(p.numel() for p in model.parameters()))
    with pytest.raises(ValueError, match="empty"):
        nt.hvp(model, CE, (x[:0], y[:0]), v)
    with pytest.raises(ValueError, match="empty"):
        nt.hvp(model, CE, [], v)
    with pytest.raises(ValueError, match="param_filter"):
        nt.hvp(model, CE, (x, y), v, param_filter="nope")
    with pytest.raises(ValueError, match="method"):
        nt.hvp(model, CE, (x, y), v, method="backward")
    with pytest.raises(ValueError, match="mode"):
        nt.hvp(model, CE, (x, y), v, mode="test")
    with pytest.raises(ValueError, match="reduction"):
        nt.hvp(model, nn.CrossEntropyLoss(reduction="sum"), (x, y), v)
    with pytest.raises(ValueError, match="missing"):
        nt.hvp(model, CE, (x, y), {"0.weight": torch.zeros(6, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="shape"):
        nt.hvp(model, CE, (x, y), v[:-1])
    with pytest.raises(ValueError, match="NaN"):
        nt.hvp(model, CE, (x, y), torch.full_like(v, float("nan")))
    with pytest.raises(ValueError, match="microbatch_size"):
        nt.hvp(model, CE, (x, y), v, microbatch_size=0)
    with pytest.raises(ValueError, match="fd_step"):
        nt.hvp(model, CE, (x, y), v, method="finite_difference", fd_step=-1.0)


def nan_hessian_case() -> tuple[nn.Module, object, tuple[Tensor, Tensor]]:
    # loss |o|^1.5 at o = 0: finite loss and gradient, infinite second derivative
    model = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    x = torch.randn(8, 2, dtype=torch.float64)
    return model, (lambda o, t: (o - t).abs().pow(1.5).mean()), (x, torch.zeros(8, 1, dtype=torch.float64))


def test_nan_in_hessian_vector_product_raises() -> None:
    model, loss_fn, data = nan_hessian_case()
    with pytest.raises(FloatingPointError, match="Hessian-vector product"):
        nt.hvp(model, loss_fn, data, torch.ones(2, dtype=torch.float64))
    with pytest.raises(FloatingPointError, match="Hessian-vector product"):
        nt.top_eigenvalues(model, loss_fn, data, k=1)
    with pytest.raises(FloatingPointError, match="Hessian-vector product"):
        nt.top_eigenvalues(model, loss_fn, data, k=1, method="power")
    with pytest.raises(FloatingPointError, match="Hessian-vector product"):
        nt.hessian_trace(model, loss_fn, data, n_samples=4)
