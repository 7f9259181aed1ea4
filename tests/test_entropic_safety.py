"""Every entropic call leaves the model exactly as it was (BatchNorm buffers, flags, .grad, hooks),
and bad input raises an error that names the value and the way out."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import DT, regression_data, tiny_regressor

LOSS = nn.MSELoss()

# Functions of (model, loss_fn, data) that must accept a model with BatchNorm in train mode.
BATCH_CALLS: dict[str, Callable[..., Any]] = {
    "entropic_loss": lambda m, lf, d: nt.entropic_loss(m, lf, d, lr=0.1, weight_decay=0.01),
    "entropic_loss_backward": lambda m, lf, d: nt.entropic_loss(m, lf, d, lr=0.1).backward(),
    "entropic_force": lambda m, lf, d: nt.entropic_force(m, lf, d, lr=0.1),
    "entropic_flow": lambda m, lf, d: nt.entropic_flow(m, lf, d, lr=0.1, time=0.1, steps=2),
    "regularizer": lambda m, lf, d: nt.EntropicRegularizer(0.1, batch_size=3)(m, lf, d),
}
DATA_CALLS: dict[str, Callable[..., Any]] = {
    "entropic_decomposition":
        lambda m, lf, d: nt.entropic_decomposition(m, lf, d, lr=0.1, batch_size=2),
    "expected_entropic_force":
        lambda m, lf, d: nt.expected_entropic_force(m, lf, d, lr=0.1, batch_size=2),
}
ALL_CALLS = {**BATCH_CALLS, **DATA_CALLS}


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
        "flags": [m.training for m in model.modules()],
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks)) for m in model.modules()],
        "global_hooks": (len(nn.modules.module._global_forward_hooks),
                         len(nn.modules.module._global_forward_pre_hooks),
                         len(nn.modules.module._global_backward_hooks)),
        "attrs": [sorted(vars(p)) for p in model.parameters()],
    }


def assert_same(a: dict[str, Any], b: dict[str, Any], *, grads: bool = True) -> None:
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), f"buffer {k} changed"
    assert a["flags"] == b["flags"]
    assert a["hooks"] == b["hooks"] and a["global_hooks"] == b["global_hooks"]
    assert a["attrs"] == b["attrs"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k])
        if grads:
            ga, gb = a["grads"][k], b["grads"][k]
            assert (ga is None and gb is None) or torch.equal(ga, gb), f".grad of {k} changed"


@pytest.mark.parametrize("name", sorted(BATCH_CALLS))
def test_batchnorm_in_train_mode_is_left_exactly_as_it_was(name: str) -> None:
    model = tiny_regressor(batchnorm=True).train()
    x, y = regression_data(6, seed=1)
    model(x)  # non-trivial running statistics
    first = dict(model.named_parameters())["0.weight"]
    first.grad = torch.full_like(first, 0.5)  # a pre-existing .grad
    before = snapshot(model)
    BATCH_CALLS[name](model, LOSS, (x, y))
    # only the explicit .backward() of the returned loss may write .grad
    assert_same(before, snapshot(model), grads=name != "entropic_loss_backward")


@pytest.mark.parametrize("name", sorted(DATA_CALLS))
def test_data_functions_refuse_train_mode_batchnorm_and_change_nothing(name: str) -> None:
    model = tiny_regressor(batchnorm=True).train()
    x, y = regression_data(6, seed=1)
    model(x)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"BatchNorm .* train mode.*model\.eval\(\)"):
        DATA_CALLS[name](model, LOSS, (x, y))
    assert_same(before, snapshot(model))
    model.eval()  # in eval mode they run, and still change nothing
    before = snapshot(model)
    DATA_CALLS[name](model, LOSS, (x, y))
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("name", sorted(set(ALL_CALLS) - {"entropic_loss_backward"}))
def test_no_gradients_or_hooks_are_left_behind(name: str) -> None:
    model = tiny_regressor()
    x, y = regression_data(6, seed=1)
    before = snapshot(model)
    ALL_CALLS[name](model, LOSS, (x, y))
    assert_same(before, snapshot(model))
    assert all(p.grad is None for p in model.parameters())


def non_scalar(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y) ** 2


def nan_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean() * math.nan


@pytest.mark.parametrize("name", sorted(set(ALL_CALLS) - {"entropic_loss_backward"}))
def test_bad_loss_functions_raise(name: str) -> None:
    model = tiny_regressor()
    data = regression_data(6, seed=1)
    call = ALL_CALLS[name]
    with pytest.raises(ValueError, match="shape .* scalar"):
        call(model, non_scalar, data)
    with pytest.raises(ValueError, match="reduction='sum'.*mean"):
        call(model, nn.MSELoss(reduction="sum"), data)
    with pytest.raises(FloatingPointError, match="not finite"):
        call(model, nan_loss, data)
    with pytest.raises(ValueError, match="NaN or Inf"):
        call(model, LOSS, (torch.full((6, 3), math.inf, dtype=DT), data[1]))
    with torch.no_grad():
        dict(model.named_parameters())["2.bias"][0] = math.nan
    with pytest.raises(FloatingPointError, match=r"'2\.bias'.*NaN"):
        call(model, LOSS, data)


@pytest.mark.parametrize("lr", [0.0, -0.1, math.nan, math.inf])
def test_bad_learning_rates_raise(lr: float) -> None:
    model = tiny_regressor()
    data = regression_data(6, seed=1)
    for call in (
        lambda: nt.entropic_loss(model, LOSS, data, lr=lr),
        lambda: nt.entropic_force(model, LOSS, data, lr=lr),
        lambda: nt.entropic_flow(model, LOSS, data, lr=lr, time=0.1, steps=1),
        lambda: nt.entropic_decomposition(model, LOSS, data, lr=lr, batch_size=2),
        lambda: nt.expected_entropic_force(model, LOSS, data, lr=lr, batch_size=2),
        lambda: nt.EntropicRegularizer(lr),
        lambda: nt.functional_entropic_loss(lambda t: (t * t).sum(), torch.ones(2), lr=lr),
    ):
        with pytest.raises(ValueError, match=r"lr must be a finite number > 0"):
            call()


@pytest.mark.parametrize("fn", [nt.entropic_decomposition, nt.expected_entropic_force])
def test_bad_batch_sizes_and_datasets_raise(fn: Callable[..., Any]) -> None:
    model = tiny_regressor()
    data = regression_data(6, seed=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fn(model, LOSS, data, lr=0.1, batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size=7 > N=6.*replacement=True"):
        fn(model, LOSS, data, lr=0.1, batch_size=7, replacement=False)
    fn(model, LOSS, data, lr=0.1, batch_size=7, replacement=True)  # allowed with replacement
    with pytest.raises(ValueError, match="data has 1 sample"):
        fn(model, LOSS, regression_data(1, seed=1), lr=0.1, batch_size=1)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fn(model, LOSS, data, lr=0.1, batch_size=2, chunk_size=0)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        fn(model, LOSS, data, lr=0.1, batch_size=2, weight_decay=-1.0)
    with pytest.raises(TypeError, match="pair"):
        fn(model, LOSS, data[0], lr=0.1, batch_size=2)


def test_bad_flow_and_step_settings_raise() -> None:
    model = tiny_regressor()
    data = regression_data(6, seed=1)
    with pytest.raises(ValueError, match="time must be a finite number > 0"):
        nt.entropic_flow(model, LOSS, data, lr=0.1, time=0.0, steps=2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        nt.entropic_flow(model, LOSS, data, lr=0.1, time=0.1, steps=0)
    with pytest.raises(ValueError, match="method must be one of"):
        nt.entropic_flow(model, LOSS, data, lr=0.1, time=0.1, steps=1, method="rk45")
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        nt.entropic_loss(model, LOSS, data, lr=0.1, n_steps=0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nt.entropic_force(lambda x: x, LOSS, data, lr=0.1)


def test_a_diverging_flow_raises_instead_of_returning_inf() -> None:
    with pytest.raises(FloatingPointError, match="diverged"):
        # f = √|θ| is finite at 0 but its gradient is not: the step leaves the finite numbers
        nt.functional_flow(lambda t: t.abs().sqrt().sum(), torch.zeros(2, dtype=DT), time=1.0,
                           steps=1, method="euler")


def test_all_finite_fast_path_is_exact() -> None:
    """The shared check (a finite sum proves finiteness) never misses a NaN/Inf, and an
    overflowing sum of finite values does not raise a false alarm."""
    from neurothermo._validate import all_finite

    assert all_finite(torch.randn(7)) and all_finite(torch.empty(0))
    for bad in ([math.nan], [math.inf], [-math.inf], [math.inf, -math.inf]):
        t = torch.randn(7)
        t[: len(bad)] = torch.tensor(bad)
        assert not all_finite(t)
    assert all_finite(torch.full((4,), 3e38, dtype=torch.float32))  # sum overflows to inf
