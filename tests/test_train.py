"""nt.train: update rules against hand-written loops, data order, determinism, resume, divergence."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import neurothermo as nt
from neurothermo.monitor.writers import JSONLWriter
from neurothermo.train import CHECKPOINT, DataOrder, TrainingDiverged


def _data(n: int = 50) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, (x.sum(1, keepdim=True) + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64))


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Dropout(dropout), nn.Linear(6, 1)).double()


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _batches(n: int, b: int, steps: int, seed: int, replacement: bool) -> list[Tensor]:
    """The documented order: a torch.Generator(seed); epochs of N // b batches of a randperm."""
    g = torch.Generator().manual_seed(seed)
    if replacement:
        return [torch.randint(n, (b,), generator=g) for _ in range(steps)]
    out: list[Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i * b:(i + 1) * b] for i in range(n // b)]
    return out[:steps]


def _manual_sgd(model: nn.Module, data: tuple[Tensor, Tensor], idx: list[Tensor | None], lr: float,
                wd: float, schedule: Callable[[int], float] = lambda t: 1.0) -> list[float]:
    """θ ← θ − lr_t·(g_B + wd·θ), written out with autograd.grad."""
    x, y = data
    losses = []
    params = list(model.parameters())
    for t, i in enumerate(idx):
        xb, yb = (x, y) if i is None else (x[i], y[i])
        loss = nn.functional.mse_loss(model(xb), yb)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * schedule(t) * (g + wd * p))
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("replacement", [False, True])
def test_sgd_matches_the_update_rule(replacement: bool) -> None:
    data, sched = _data(), (lambda t: 1.0 / (1 + 0.1 * t))
    ref = _model()
    ref_losses = _manual_sgd(ref, data, _batches(50, 8, 30, 3, replacement), 0.1, 0.01, sched)
    model = _model()
    hist = nt.train(model, nn.MSELoss(), data, lr=0.1, batch_size=8, steps=30, weight_decay=0.01,
                    replacement=replacement, lr_schedule=sched, seed=3)
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hist["loss"], ref_losses, rtol=1e-12)
    np.testing.assert_allclose(hist["lr"], [0.1 * sched(t) for t in range(30)], rtol=1e-15)


def test_gd_is_full_batch_gradient_descent() -> None:
    data = _data()
    ref = _model()
    _manual_sgd(ref, data, [None] * 15, 0.05, 0.0)
    model = _model()
    nt.train(model, nn.MSELoss(), data, optimizer="gd", lr=0.05, steps=15)
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "make"), [
    ("momentum", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3)),
])
def test_momentum_and_adam_are_torchs(name: str, make: Callable[..., torch.optim.Optimizer]) -> None:
    x, y = _data()
    ref = _model()
    opt = make(ref.parameters())
    for i in _batches(50, 10, 20, 0, False):
        opt.zero_grad()
        nn.functional.mse_loss(ref(x[i]), y[i]).backward()
        opt.step()
    model = _model()
    lr = 0.05 if name == "momentum" else 0.01
    nt.train(model, nn.MSELoss(), (x, y), optimizer=name, lr=lr, batch_size=10, steps=20,
             weight_decay=1e-3, momentum=0.9 if name == "momentum" else 0.0)
    assert torch.equal(_flat(model), _flat(ref))


def test_data_order_epochs_cover_every_sample_once() -> None:
    order = DataOrder(23, 5, replacement=False, full=False, seed=1)
    for _ in range(3):  # three epochs of 4 batches; 3 samples dropped each epoch
        seen = torch.cat([order.next() for _ in range(4)])  # type: ignore[misc]
        assert len(set(seen.tolist())) == 20
    assert order.epoch == 2
    state = order.state_dict()
    a = [order.next() for _ in range(6)]
    order.load_state_dict(state)
    b = [order.next() for _ in range(6)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # type: ignore[arg-type]


def test_deterministic_and_leaves_global_rng_alone() -> None:
    data = _data()
    runs = []
    for seed in (0, 0, 1):
        model = _model(dropout=0.3)
        state = torch.get_rng_state()
        nt.train(model, nn.MSELoss(), data, lr=0.05, batch_size=5, steps=12, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


class _Interrupt:
    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, step: int, model: nn.Module, loss: Tensor) -> None:
        if step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize(("optimizer", "replacement"), [("sgd", False), ("momentum", True), ("adam", False)])
def test_resume_after_interrupt_gives_the_same_run(tmp_path, optimizer: str, replacement: bool) -> None:
    data = _data()
    kw = {"optimizer": optimizer, "lr": 0.02, "batch_size": 7, "steps": 25, "seed": 5,
          "replacement": replacement, "momentum": 0.5 if optimizer == "momentum" else 0.0}
    full = _model(dropout=0.2)
    h_full = nt.train(full, nn.MSELoss(), data, **kw)
    part = _model(dropout=0.2)
    with pytest.raises(KeyboardInterrupt):  # interrupted between checkpoints (written at 5, 10)
        nt.train(part, nn.MSELoss(), data, checkpoint_every=5, out=tmp_path,
                 callbacks=[_Interrupt(12)], **kw)
    resumed = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 1)).double()
    h = nt.train(resumed, nn.MSELoss(), data, checkpoint_every=5, out=tmp_path, resume=True, **kw)
    assert torch.equal(_flat(resumed), _flat(full))
    np.testing.assert_array_equal(h["loss"], h_full["loss"])
    assert (tmp_path / "history.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "history.jsonl"]  # no temp files


def test_resume_with_monitor_and_writer(tmp_path) -> None:
    data = _data()
    kw = {"lr": 0.05, "batch_size": 5, "steps": 20, "seed": 2}

    def monitor(path):
        return nt.ThermoMonitor(m, nn.MSELoss(), symmetries=None, noise_every=None, sync_every=3,
                                writer=JSONLWriter(path))

    m = _model()
    ref = nt.train(m, nn.MSELoss(), data, monitor=monitor(tmp_path / "ref.jsonl"), **kw)
    m = _model()
    with pytest.raises(KeyboardInterrupt):
        nt.train(m, nn.MSELoss(), data, monitor=monitor(tmp_path / "run.jsonl"), out=tmp_path / "o",
                 checkpoint_every=4, callbacks=[_Interrupt(13)], **kw)
    m = _model()
    h = nt.train(m, nn.MSELoss(), data, monitor=monitor(tmp_path / "run.jsonl"), out=tmp_path / "o",
                 checkpoint_every=4, resume=True, **kw)
    assert h.to_dicts() == ref.to_dicts()
    lines = [nt.History.from_jsonl(tmp_path / f).to_dicts() for f in ("ref.jsonl", "run.jsonl")]
    assert lines[0] == lines[1] == ref.to_dicts()  # rows after the checkpoint were not duplicated


def test_resume_extends_a_finished_run_and_without_checkpoint_starts_fresh(tmp_path) -> None:
    data = _data()
    kw = {"lr": 0.05, "batch_size": 5, "seed": 4}
    direct = _model()
    nt.train(direct, nn.MSELoss(), data, steps=16, **kw)
    m = _model()
    nt.train(m, nn.MSELoss(), data, steps=9, out=tmp_path, resume=True, **kw)  # nothing to resume
    h = nt.train(m, nn.MSELoss(), data, steps=16, out=tmp_path, resume=True, **kw)
    assert torch.equal(_flat(m), _flat(direct)) and len(h) == 16
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 16 and {"model", "optimizer", "data_order", "rng"} <= set(ckpt)
    with pytest.raises(ValueError, match="written with lr=0.05"):
        nt.train(_model(), nn.MSELoss(), data, steps=20, out=tmp_path, resume=True,
                 **{**kw, "lr": 0.1})
    with pytest.raises(ValueError, match="past steps=10"):
        nt.train(_model(), nn.MSELoss(), data, steps=10, out=tmp_path, resume=True, **kw)


def test_divergence_names_step_lr_loss_and_checkpoint(tmp_path) -> None:
    data = _data()
    with pytest.raises(TrainingDiverged) as info:
        nt.train(_model(), nn.MSELoss(), data, lr=3.0, batch_size=10, steps=200,
                 checkpoint_every=2, out=tmp_path)
    e = info.value
    msg = str(e)
    assert f"step {e.step}" in msg and "lr=3" in msg and "last finite loss" in msg
    assert e.last_finite_loss is not None and math.isfinite(e.last_finite_loss)
    assert e.checkpoint == tmp_path / CHECKPOINT and str(e.checkpoint) in msg
    ckpt = torch.load(e.checkpoint, weights_only=True)
    assert ckpt["step"] <= e.step  # the checkpoint holds a finite state from before the divergence
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        nt.train(_model(), nn.MSELoss(), data, lr=3.0, batch_size=10, steps=200)


def test_bad_input(tmp_path) -> None:
    data, m, mse = _data(), _model(), nn.MSELoss()
    cases = [
        ({"lr": 0.0}, ValueError, "lr must be"),
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"batch_size": 51}, ValueError, "exceeds the dataset size"),
        ({"batch_size": None}, ValueError, "batch_size is required"),
        ({"optimizer": "rmsprop"}, ValueError, "optimizer must be one of"),
        ({"momentum": 0.9}, ValueError, "only used by optimizer='momentum'"),
        ({"optimizer": "momentum"}, ValueError, "0 < momentum < 1"),
        ({"optimizer": "gd", "batch_size": 10}, ValueError, "full batch"),
        ({"checkpoint_every": 5}, ValueError, "needs out="),
        ({"resume": True}, ValueError, "needs out="),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"lr_schedule": 3}, TypeError, "lr_schedule must be"),
        ({"lr_schedule": lambda t: math.nan}, ValueError, "lr factor must be finite"),
        ({"monitor": object()}, TypeError, "after_backward"),
        ({"seed": -1}, ValueError, "seed"),
    ]
    for kw, err, match in cases:
        args = {"lr": 0.1, "batch_size": 10, "steps": 3, **kw}
        with pytest.raises(err, match=match):
            nt.train(m, mse, data, **args)
    with pytest.raises(ValueError, match="reduction='sum'"):
        nt.train(m, nn.MSELoss(reduction="sum"), data, lr=0.1, batch_size=10, steps=3)
    with pytest.raises(ValueError, match="same number of|disagree on the batch size"):
        nt.train(m, mse, (data[0], data[1][:10]), lr=0.1, batch_size=10, steps=3)
    with torch.no_grad():
        m[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"'0.weight' holds NaN"):
        nt.train(m, mse, data, lr=0.1, batch_size=10, steps=3)
    with pytest.raises(ValueError, match="scalar"):
        nt.train(_model(), lambda o, t: (o - t) ** 2, data, lr=0.1, batch_size=10, steps=3)
