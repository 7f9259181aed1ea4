"""ThermoMonitor: every recorded quantity against a direct computation; monitors never change training."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import neurothermo as nt
from neurothermo.monitor import names
from neurothermo.monitor.monitor import MonitorWarning


def _data(n: int = 40, d: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)


def _mixed() -> nn.Module:
    """Rescale (0→2, 3→5), double rotation (2→3), whole scale (5 → LayerNorm), in float64."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 7),
        nn.LayerNorm(7, eps=0.0, elementwise_affine=False), nn.Tanh(), nn.Linear(7, 1)).double()


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 1)).double()


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_every_recorded_quantity_against_direct_computation() -> None:
    x, y = _data()
    model, mse = _mixed(), nn.MSELoss()
    lr, wd, b, ema = 0.05, 0.01, 8, 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    mon = nt.ThermoMonitor(model, mse, optimizer=opt, noise_every=None, ema=ema)
    params = dict(model.named_parameters())
    ref: dict[str, list] = {"grad_sq": [], "w": [], "in": [], "out": [], "J": [], "dJ": [], "pred": []}
    for step in range(6):
        for g in opt.param_groups:  # a schedule: the monitor must read the current lr
            g["lr"] = lr / (1 + step)
        idx = torch.arange(step * b, (step + 1) * b) % 40
        opt.zero_grad()
        loss = mse(model(x[idx]), y[idx])
        loss.backward()
        mon.after_backward(step, (x[idx], y[idx]), loss=loss)
        if step == 0:
            syms = [s for s in nt.find_symmetries(model, x[:8]) if not s.isometry]
            assert [s.kind for s in syms] == ["rescale", "double_rotation", "rescale", "scale"]
        grads = {n: p.grad.clone() for n, p in params.items()}
        ref["grad_sq"].append([sum(float(grads[f"{k}.{t}"].pow(2).sum()) for t in ("weight", "bias"))
                               for k in (0, 2, 3, 5, 8)])
        ref["w"].append([float(torch.cat([params[f"{k}.weight"].flatten(), params[f"{k}.bias"]]).detach().norm())
                         for k in (0, 2, 3, 5, 8)])
        # per-unit energies written out: rows of the producer (+ bias), columns of the consumer
        ref["in"].append(grads["0.weight"].pow(2).sum(1) + grads["0.bias"].pow(2))
        ref["out"].append(grads["2.weight"].pow(2).sum(0))
        before = [s.charge(model) for s in syms]
        ref["pred"].append([s.predict_charge(j, grads, lr / (1 + step), wd) - j
                            for s, j in zip(syms, before)])
        opt.step()
        mon.after_step(step)
        ref["J"].append(before)
        ref["dJ"].append([s.charge(model) - j for s, j in zip(syms, before)])
    h = mon.history
    assert h.meta["layers"] == ["0", "2", "3", "5", "8"]
    assert [s["kind"] for s in h.meta["symmetries"]] == ["rescale", "double_rotation", "rescale", "scale"]
    got = np.stack([h[names.grad_sq(k)] for k in h.meta["layers"]], 1)
    np.testing.assert_allclose(got, ref["grad_sq"], rtol=1e-13)
    np.testing.assert_allclose(np.stack([h[names.weight_norm(k)] for k in h.meta["layers"]], 1),
                               ref["w"], rtol=1e-13)
    # running expectation: Σ_s β^{t−s} x_s / Σ_s β^{t−s} (the bias-corrected EMA), written out
    w = np.array([[ema ** (t - s) if s <= t else 0.0 for s in range(6)] for t in range(6)])
    running = (w @ got) / w.sum(1, keepdims=True)
    np.testing.assert_allclose(np.stack([h[names.grad_sq_ema(k)] for k in h.meta["layers"]], 1),
                               running, rtol=1e-13)
    np.testing.assert_allclose(h[names.layer_ratio("0", "2")], running[:, 0] / running[:, 1], rtol=1e-13)
    np.testing.assert_allclose(h[names.layer_residual("0", "2")],
                               (running[:, 0] - running[:, 1]) / (running[:, 0] + running[:, 1]), rtol=1e-12)
    e_in, e_out = torch.stack(ref["in"]).numpy(), torch.stack(ref["out"]).numpy()
    np.testing.assert_allclose(h[names.energy_in(0)], e_in, rtol=1e-13)
    np.testing.assert_allclose(h[names.energy_out(0)], e_out, rtol=1e-13)
    run_in, run_out = w @ e_in, w @ e_out  # per-unit running expectations (up to a common factor)
    np.testing.assert_allclose(h[names.neuron_ratio(0)], run_in.sum(1) / run_out.sum(1), rtol=1e-12)
    np.testing.assert_allclose(h[names.neuron_residual(0)],
                               np.abs(run_in - run_out).sum(1) / (run_in + run_out).sum(1), rtol=1e-12)
    np.testing.assert_allclose(h[names.TEMPERATURE], [lr / (1 + t) / b for t in range(6)], rtol=1e-15)
    for i in range(4):
        j = np.stack([r[i].numpy() for r in ref["J"]])
        meas = np.stack([r[i].numpy() for r in ref["dJ"]])
        scale = np.abs(j).max()  # J is a difference of squared norms: rounding is relative to them
        np.testing.assert_allclose(h[names.charge(i)], j, rtol=1e-13, atol=1e-14 * scale)
        np.testing.assert_allclose(h[names.charge_meas(i)], meas, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(h[names.charge_pred(i)], np.stack([r[i].numpy() for r in ref["pred"]]),
                                   rtol=1e-9, atol=1e-15)
        # the exact SGD identity: measured and predicted changes agree to float64 rounding of J
        assert h[names.charge_err(i)].max() <= 1e-13 * max(1.0, np.abs(j).max())
        assert np.abs(meas).max() > 1e4 * h[names.charge_err(i)].max()  # ... and the change is real


@pytest.mark.parametrize("with_data", [True, False])
def test_monitor_never_changes_training(tmp_path, with_data: bool) -> None:
    """Same seed with and without a monitor (dropout; noise, sharpness passes): same bits."""
    data = _data()
    kw = {"lr": 0.05, "batch_size": 8, "steps": 7, "seed": 3, "weight_decay": 1e-3}
    plain = _mlp(dropout=0.3)
    nt.train(plain, nn.MSELoss(), data, **kw)
    watched = _mlp(dropout=0.3)
    extra = {"sharpness_every": 3, "data": data} if with_data else {}
    mon = nt.ThermoMonitor(watched, nn.MSELoss(), noise_every=2, sync_every=2,
                           writer=nt.JSONLWriter(tmp_path / "m.jsonl"), **extra)
    hist = nt.train(watched, nn.MSELoss(), data, monitor=mon, **kw)
    assert torch.equal(_flat(plain), _flat(watched))
    assert all(p.grad is not None for p in watched.parameters())
    np.testing.assert_array_equal(hist.steps("entropic/trace_sigma"), [0, 2, 4, 6])
    if with_data:
        np.testing.assert_array_equal(hist.steps(names.SHARPNESS), [0, 3, 6])


def _per_sample_sq_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Naive reference: one backward per sample."""
    out = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1]),
                                list(model.parameters()))
        out.append(sum(t.pow(2).sum() for t in g))
    return torch.stack(out)


@pytest.mark.parametrize("replacement", [True, False])
def test_noise_terms_from_the_batch(replacement: bool) -> None:
    x, y = _data()
    model, mse, lr, wd, b, n = _mlp(), nn.MSELoss(), 0.1, 0.02, 10, 40
    mon = nt.ThermoMonitor(model, mse, lr=lr, weight_decay=wd, noise_every=1, symmetries=None,
                           dataset_size=n, replacement=replacement)
    xb, yb = x[:b], y[:b]
    loss = mse(model(xb), yb)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    mon.after_backward(0, (xb, yb), loss=loss)
    mon.after_step(0)
    sq = _per_sample_sq_norms(model, xb, yb)
    gb = sum(g.pow(2).sum() for g in grads)
    gwd = sum((g + wd * p.detach()).pow(2).sum() for g, p in zip(grads, model.parameters()))
    tr = b / (b - 1) * (sq.mean() - gb) * (1 if replacement else (n - 1) / n)
    tr_b = tr / b if replacement else tr * (n - b) / (b * (n - 1))
    h = mon.history
    assert h["entropic/trace_sigma"][0] == pytest.approx(float(tr), rel=1e-10)
    assert h["entropic/noise"][0] == pytest.approx(float(lr / 4 * tr_b), rel=1e-10)
    assert h["entropic/discretization"][0] == pytest.approx(float(lr / 4 * (gwd - tr_b)), rel=1e-10)
    penalty = wd / 2 * sum(p.detach().pow(2).sum() for p in model.parameters())
    assert h["entropic/loss"][0] == pytest.approx(float(loss.detach() + penalty), rel=1e-12)


def test_noise_terms_over_data_are_the_exact_decomposition() -> None:
    data = _data()
    model, mse = _mlp(), nn.MSELoss()
    mon = nt.ThermoMonitor(model, mse, lr=0.1, noise_every=1, symmetries=None, data=data,
                           replacement=False)
    loss = mse(model(data[0][:8]), data[1][:8])
    loss.backward()
    mon.after_backward(0, (data[0][:8], data[1][:8]), loss=loss)
    mon.after_step(0)
    d = nt.entropic_decomposition(model, mse, data, lr=0.1, batch_size=8, replacement=False)
    for key in ("loss", "discretization", "noise", "total", "trace_sigma"):
        assert mon.history[f"entropic/{key}"][0] == pytest.approx(getattr(d, key), rel=1e-12)


def test_sharpness_matches_dense_hessian() -> None:
    data = _data(n=20)
    model, mse = _mlp(), nn.MSELoss()
    mon = nt.ThermoMonitor(model, mse, lr=0.1, noise_every=None, sharpness_every=1, data=data,
                           symmetries=None)
    loss = mse(model(data[0][:4]), data[1][:4])
    loss.backward()
    mon.after_backward(0, (data[0][:4], data[1][:4]), loss=loss)
    mon.after_step(0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in params.items()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def f(v: Tensor) -> Tensor:
        parts, i = {}, 0
        for n, s in shapes.items():
            parts[n] = v[i:i + s.numel()].reshape(s)
            i += s.numel()
        return mse(torch.func.functional_call(model, parts, (data[0],)), data[1])

    lam = float(torch.linalg.eigvalsh(torch.func.hessian(f)(flat))[-1])
    assert mon.history[names.SHARPNESS][0] == pytest.approx(lam, rel=1e-3)  # the tracker's tol
    assert mon.history[names.LR_SHARPNESS][0] == pytest.approx(0.1 * mon.history[names.SHARPNESS][0])


def test_momentum_and_adam_record_no_prediction_and_say_why() -> None:
    x, y = _data()
    for opt_cls, kw in ((torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {})):
        model = _mlp()
        opt = opt_cls(model.parameters(), lr=0.01, **kw)
        mon = nt.ThermoMonitor(model, nn.MSELoss(), optimizer=opt, noise_every=None)
        for step in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
            if step == 0:
                with pytest.warns(MonitorWarning, match="charge predictions not recorded"):
                    mon.after_backward(step, (x[:8], y[:8]))
            else:
                mon.after_backward(step, (x[:8], y[:8]))
            opt.step()
            mon.after_step(step)
        h = mon.history
        assert names.charge_meas(0) in h and names.charge_pred(0) not in h
        assert any("not plain SGD" in n for n in h.meta["notes"])


def test_every_sync_and_jsonl_writer(tmp_path) -> None:
    data = _data()
    model = _mlp()
    mon = nt.ThermoMonitor(model, nn.MSELoss(), every=3, noise_every=4, sync_every=2,
                           writer=nt.JSONLWriter(tmp_path / "run.jsonl"))
    writes = []
    real_write = mon.writer.write
    mon.writer.write = lambda rows, meta: (writes.append([r["step"] for r in rows]), real_write(rows, meta))
    h = nt.train(model, nn.MSELoss(), data, lr=0.05, batch_size=8, steps=10, monitor=mon)
    np.testing.assert_array_equal(h.steps(names.LOSS), np.arange(10))  # loss: every step
    np.testing.assert_array_equal(h.steps(names.grad_sq("0")), [0, 3, 6, 9])
    np.testing.assert_array_equal(h.steps(names.energy_in(0)), [0, 3, 6, 9])
    np.testing.assert_array_equal(h.steps("entropic/noise"), [0, 4, 8])
    assert writes[0] == [0] and writes[1] == [1, 2, 3, 4, 5, 6]  # synced at recorded steps 0, 6
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["__meta__"]["layers"] == ["0", "3"]
    assert nt.History.from_jsonl(tmp_path / "run.jsonl").to_dicts() == h.to_dicts()


def test_state_dict_round_trip() -> None:
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = nt.ThermoMonitor(model, nn.MSELoss(), optimizer=opt, noise_every=None)
    for step in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
        mon.after_backward(step, (x[:8], y[:8]))
        opt.step()
        mon.after_step(step)
    other = nt.ThermoMonitor(model, nn.MSELoss(), optimizer=opt, noise_every=None)
    other.load_state_dict(mon.state_dict())
    assert other.history.to_dicts() == mon.history.to_dicts()
    assert torch.equal(other._ema_layer, mon._ema_layer)


def test_bad_input() -> None:
    model, mse = _mlp(), nn.MSELoss()
    with pytest.raises(ValueError, match="every must be >= 1"):
        nt.ThermoMonitor(model, mse, every=0)
    with pytest.raises(ValueError, match="ema must be"):
        nt.ThermoMonitor(model, mse, ema=1.0)
    with pytest.raises(ValueError, match="sharpness_every needs data"):
        nt.ThermoMonitor(model, mse, sharpness_every=5)
    with pytest.raises(ValueError, match="either optimizer= or lr="):
        nt.ThermoMonitor(model, mse, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="symmetries must be"):
        nt.ThermoMonitor(model, mse, symmetries="all")
    with pytest.raises(TypeError, match="writer needs"):
        nt.ThermoMonitor(model, mse, writer="log.jsonl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction='sum'"):
        nt.ThermoMonitor(model, nn.MSELoss(reduction="sum"))
    with pytest.raises(ValueError, match="no trainable parameters"):
        nt.ThermoMonitor(nn.ReLU(), mse)
    mon = nt.ThermoMonitor(model, mse, lr=0.1, noise_every=None)
    x, y = _data()
    nn.functional.mse_loss(model(x[:4]), y[:4]).backward()
    with pytest.raises(RuntimeError, match="without after_backward"):
        mon.after_step(0)
    with pytest.raises(TypeError, match="without targets; pass the pair"):
        mon.after_backward(0, x[:4])  # type: ignore[arg-type]
    mon.after_backward(0, (x[:4], y[:4]))
    with pytest.raises(RuntimeError, match=r"after_step\(0\) was not called"):
        mon.after_backward(1, (x[:4], y[:4]))
    quiet = nt.ThermoMonitor(model, mse, noise_every=None, symmetries=None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        quiet.after_backward(0, (x[:4], y[:4]))
    assert any("no lr known" in str(m.message) for m in w)
    assert names.TEMPERATURE not in (quiet.after_step(0) or quiet.history)
    single = nt.ThermoMonitor(model, mse, lr=0.1, noise_every=1, symmetries=None)
    with pytest.warns(MonitorWarning, match="need b >= 2"):
        single.after_backward(0, (x[:1], y[:1]))
    single.after_step(0)
    assert "entropic/noise" not in single.history and single.history.meta["notes"]
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with_bn = nt.ThermoMonitor(bn, mse, lr=0.1, noise_every=1, symmetries=None)
    nn.functional.mse_loss(bn(x[:6]), y[:6]).backward()
    with pytest.warns(MonitorWarning, match="BatchNorm '1' is in train mode"):
        with_bn.after_backward(0, (x[:6], y[:6]))


def test_tensorboard_writer(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    model = _mlp()
    writer = nt.TensorBoardWriter(tmp_path / "tb")
    mon = nt.ThermoMonitor(model, nn.MSELoss(), noise_every=None, writer=writer)
    nt.train(model, nn.MSELoss(), _data(), lr=0.05, batch_size=8, steps=3, monitor=mon)
    mon.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(writer.log_dir)).Reload()
    assert [e.step for e in acc.Scalars(names.LOSS)] == [0, 1, 2]
    np.testing.assert_allclose([e.value for e in acc.Scalars(names.LOSS)], mon.history[names.LOSS], rtol=1e-6)
    assert names.energy_in(0) in acc.Tags()["histograms"]


def test_lightning_callback() -> None:
    lightning = pytest.importorskip("lightning")
    from neurothermo.monitor.lightning import ThermoMonitorCallback

    x, y = _data()
    net = _mlp()

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    mon = nt.ThermoMonitor(net, nn.MSELoss(), noise_every=None)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = lightning.Trainer(max_steps=4, callbacks=[ThermoMonitorCallback(mon)], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), loader)
    h = mon.history
    np.testing.assert_array_equal(h.steps(names.LOSS), [0, 1, 2, 3])
    assert h[names.charge_err(0)].max() < 1e-12  # SGD's exact identity, through Lightning
    np.testing.assert_allclose(h[names.TEMPERATURE], 0.05 / 8)


def _sgd_run(mon_kw: dict, *, drop_bias_grad_at: int | None = None, read_every_step: bool = False,
             steps: int = 5) -> nt.ThermoMonitor:
    x, y = _data()
    model = _mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = nt.ThermoMonitor(model, nn.MSELoss(), optimizer=opt, noise_every=None, **mon_kw)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
        if step == drop_bias_grad_at:
            model[0].bias.grad = None  # this step leaves the bias alone (SGD skips it)
        mon.after_backward(step, (x[:8], y[:8]))
        opt.step()
        mon.after_step(step)
        if read_every_step:
            assert len(mon.history[names.grad_sq("0")]) == step + 1  # reading derives what is pending
    return mon


def test_derived_columns_do_not_depend_on_when_history_is_flushed() -> None:
    """Derived columns are computed per block at flush; one block or one row per block: same numbers."""
    blocks = _sgd_run({"sync_every": 100}).history
    rows = _sgd_run({"sync_every": 1}, read_every_step=True).history
    assert blocks.columns == rows.columns
    for c in blocks.columns:
        np.testing.assert_array_equal(blocks.steps(c), rows.steps(c))
        # the running averages advance row by row either way; only a sum's order may differ
        np.testing.assert_allclose(blocks[c], rows[c], rtol=1e-14, atol=1e-300, err_msg=c)


def test_a_missing_gradient_counts_as_zero_and_the_charge_check_sees_it() -> None:
    x, y = _data()
    h = _sgd_run({}, drop_bias_grad_at=2).history
    ref = _sgd_run({}, steps=2).history  # the first two steps are the same run
    np.testing.assert_array_equal(h[names.energy_in(0)][:2], ref[names.energy_in(0)])
    # step 2 recomputed by hand: the bias has no gradient, so it adds nothing to the energies
    model = _mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
        if step == 2:
            g = model[0].weight.grad
            np.testing.assert_allclose(h[names.energy_in(0)][2], g.pow(2).sum(1).numpy(), rtol=1e-13)
            np.testing.assert_allclose(h[names.grad_sq("0")][2], float(g.pow(2).sum()), rtol=1e-13)
        opt.step()
    # Leaving the bias out breaks the Noether identity w·g_w + b·g_b = u·g_u behind the exact
    # prediction, so the first-order term −2η·b·g_b survives: the check flags exactly that step.
    err = h[names.charge_err(0)]
    scale = max(1.0, np.abs(h[names.charge(0)]).max())
    assert np.delete(err, 2).max() <= 1e-13 * scale
    assert err[2] > 1e6 * 1e-13 * scale


def _noise_loop(noise_every: int, steps: int, *, logging_forward: bool = False
                ) -> tuple[nt.ThermoMonitor, list[float], nn.Module]:
    """SGD on batches of 10 with a monitor; the expected Tr Σ at each noise step from the
    per-sample loop, computed after the monitor has read the step (its forwards come later)."""
    x, y = _data()
    model, mse, b = _mlp(), nn.MSELoss(), 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = nt.ThermoMonitor(model, mse, optimizer=opt, noise_every=noise_every, symmetries=None)
    expected = []
    for step in range(steps):
        xb, yb = x[b * (step % 4):b * (step % 4 + 1)], y[b * (step % 4):b * (step % 4 + 1)]
        opt.zero_grad(set_to_none=True)
        if logging_forward:
            model(xb)  # a second forward with gradients in the step (e.g. a logging pass)
        loss = mse(model(xb), yb)
        loss.backward()
        mon.after_backward(step, (xb, yb), loss=loss)
        if step % noise_every == 0:
            sq = _per_sample_sq_norms(model, xb, yb)
            gb = sum(p.grad.pow(2).sum() for p in model.parameters())
            expected.append(float(b / (b - 1) * (sq.mean() - gb)))
        opt.step()
        mon.after_step(step)
    return mon, expected, model


def test_noise_terms_read_from_the_training_pass_after_the_first(monkeypatch) -> None:
    """After one extra pass, per-sample norms come from the loop's own forward/backward; same values."""
    import neurothermo.gradstats as gs

    calls = []
    real = gs.per_sample_grad_norms
    monkeypatch.setattr(gs, "per_sample_grad_norms", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    mon, expected, model = _noise_loop(2, 5)
    assert len(calls) == 1  # step 0 only; steps 2 and 4 were captured from the loop's pass
    np.testing.assert_allclose(mon.history["entropic/trace_sigma"], expected, rtol=1e-10)
    assert not any("extra pass" in n for n in mon.history.meta["notes"])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_close_removes_the_hooks_armed_for_the_next_noise_step() -> None:
    """The last of 4 steps arms the capture for step 4 (noise every 2), which never comes: close()
    must leave the model unhooked, so a later forward is not recorded and a later
    per_sample_grad_norms matches the per-sample loop."""
    mon, _, model = _noise_loop(2, 4)
    assert any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # armed
    mon.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    x, y = _data()
    got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x[:10], y[:10]))
    np.testing.assert_allclose(got.numpy(),  # squared norms
                               _per_sample_sq_norms(model, x[:10], y[:10]).numpy(), rtol=1e-10)


def test_an_unusable_capture_falls_back_to_the_extra_pass_and_says_why() -> None:
    with pytest.warns(MonitorWarning, match="extra pass"):
        mon, expected, _ = _noise_loop(1, 3, logging_forward=True)
    np.testing.assert_allclose(mon.history["entropic/trace_sigma"], expected, rtol=1e-10)
    assert any("more than once" in n for n in mon.history.meta["notes"])


def test_a_history_held_by_the_caller_is_never_partial() -> None:
    mon = _sgd_run({"sync_every": 100}, steps=1)
    held = mon._history  # the object nt.train returns; derived columns are still pending below
    model_steps = held.steps(names.grad_sq("0"))
    np.testing.assert_array_equal(model_steps, [0])
    assert names.charge_err(0) in held and len(held) == 1


def test_square_sums_along_every_axis_and_view_against_direct_sums() -> None:
    """The per-unit reductions (``[A, n, B]`` order, reused buffers) equal ``Σ t²`` over the other
    axes in float64, for every axis, with a view, and a result never aliases the reused buffer."""
    from neurothermo.monitor.quantities import SquareSums

    g = torch.Generator().manual_seed(0)
    t = {"w": torch.randn(6, 5, 3, 2, generator=g, dtype=torch.float64),
         "row": torch.randn(1, 7, generator=g, dtype=torch.float64),
         "b": torch.randn(4, generator=g, dtype=torch.float64),
         "tw": torch.randn(5, 6, generator=g, dtype=torch.float64).T}  # not contiguous
    keys = [("w", d, None) for d in range(4)] + [("w", 1, (6, 5, 6)), ("row", 1, None),
                                                ("row", 0, None), ("b", 0, None), ("tw", 1, None),
                                                ("tw", 0, None)]
    scratch: dict = {}
    first = SquareSums(t, scratch).prepare(keys, list(t))
    for name, dim, view in keys:
        v = t[name] if view is None else t[name].view(view)
        others = [d for d in range(v.ndim) if d != dim]
        ref = v.square().sum(others) if others else v.square()  # (sum([]) sums everything)
        torch.testing.assert_close(first._along[(name, dim, view)], ref, rtol=1e-14, atol=0)
    saved = {k: r.clone() for k, r in first._along.items()}
    SquareSums({n: 2 * x for n, x in t.items()}, scratch).prepare(keys, list(t))  # same buffers
    for k, r in first._along.items():
        assert torch.equal(r, saved[k]), k


def test_per_unit_scale_charges_in_front_of_batchnorm_against_direct_computation() -> None:
    """Conv → BatchNorm (eps = 1e-30: invariant to float64 rounding): every conv row is a per-unit scale symmetry; its charge ``‖w_u‖²``, the
    measured change and SGD's exact prediction come from the shared per-unit sums (read along
    axis 0 and, for the next layer's rescale, axis 1 of the same conv weight)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6, eps=1e-30), nn.ReLU(),
                          nn.Conv2d(6, 5, 3, bias=False), nn.BatchNorm2d(5, eps=1e-30), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5 * 4 * 4, 2)).double()
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    mse, lr, wd = nn.MSELoss(), 0.1, 0.01
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    syms = [s for s in nt.find_symmetries(model, x[:4]) if not s.isometry]  # BatchNorm in train mode
    assert sorted({s.kind for s in syms}) == ["rescale", "scale"]
    assert any(s.kind == "scale" and s.block == 1 and not s.whole for s in syms)
    mon = nt.ThermoMonitor(model, mse, optimizer=opt, noise_every=None, symmetries=syms)
    ref: dict[str, list] = {"J": [], "dJ": [], "pred": []}
    for step in range(4):
        idx = torch.arange(step * 4, step * 4 + 8) % 16
        opt.zero_grad()
        mse(model(x[idx]), y[idx]).backward()
        mon.after_backward(step, (x[idx], y[idx]))
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = [s.charge(model) for s in syms]
        ref["pred"].append([s.predict_charge(j, grads, lr, wd) - j for s, j in zip(syms, before)])
        opt.step()
        mon.after_step(step)
        ref["J"].append(before)
        ref["dJ"].append([s.charge(model) - j for s, j in zip(syms, before)])
    h = mon.history
    for i in range(len(syms)):
        j = np.stack([r[i].numpy() for r in ref["J"]])
        meas = np.stack([r[i].numpy() for r in ref["dJ"]])
        np.testing.assert_allclose(h[names.charge(i)], j, rtol=1e-13, atol=1e-14 * np.abs(j).max())
        np.testing.assert_allclose(h[names.charge_meas(i)], meas, rtol=1e-11, atol=1e-15)
        np.testing.assert_allclose(h[names.charge_pred(i)], np.stack([r[i].numpy() for r in ref["pred"]]),
                                   rtol=1e-9, atol=1e-15)
        assert h[names.charge_err(i)].max() <= 1e-13 * max(1.0, np.abs(j).max())
        assert np.abs(meas).max() > 1e4 * h[names.charge_err(i)].max()


@pytest.mark.parametrize("chunk", [1, 100, 72 * 70, None])
def test_square_sums_in_row_blocks_against_direct_sums(monkeypatch, chunk: int | None) -> None:
    """All axes of a tensor from one read, a block of leading-axis rows at a time (``chunk``
    entries per block: one row, a few rows, 70 of 150 rows so that blocks add up by a
    matrix-vector product and the last, short block by a sum, or the default): every reduction
    equals the float64 ``Σ t²`` over the other axes, for conv weights (3×3 and 1×1), Linear
    weights, norm-layer vectors and a view, on the real keys of the symmetries found in a network
    with BatchNorm, GroupNorm, a 1×1 conv and Linear layers, on parameters and on gradients."""
    from neurothermo.monitor import quantities
    from neurothermo.monitor.derive import deferred_charge
    from neurothermo.monitor.quantities import SquareSums
    from neurothermo.monitor.symmetries import track

    if chunk is not None:
        monkeypatch.setattr(quantities, "_CHUNK_NUMEL", chunk)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.GroupNorm(2, 8), nn.ReLU(),
                          nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 7),
                          nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    model(x).square().mean().backward()
    named = dict(model.named_parameters())
    tracked = track(nt.find_symmetries(model, x[:4]), named)
    keys = list(dict.fromkeys((s.name, s.dim, s.view) for t in tracked if t.per_unit or deferred_charge(t)
                              for s in t.sym.slices
                              if s.role != "passive" and not s.buffer and s.dim is not None))
    axes = {(n, d) for n, d, _ in keys}
    # the conv weights are read along both axes, the 1×1 conv and a Linear weight too
    assert {("0.weight", 0), ("3.weight", 0), ("3.weight", 1), ("6.weight", 1), ("9.weight", 0),
            ("9.weight", 1), ("11.weight", 1)} <= axes, sorted(axes)
    g = torch.Generator().manual_seed(1)
    big = {"w": torch.randn(150, 8, 3, 3, generator=g, dtype=torch.float64)}
    big_keys = [("w", d, None) for d in range(4)] + [("w", 1, (150, 8, 9)), ("w", -1, None),
                                                    ("w", -3, (150, 8, 9))]  # (numbered from the end)
    scratch: dict = {}
    for tensors, ks in [({n: p.detach() for n, p in named.items()}, keys),
                        ({n: p.grad for n, p in named.items()}, keys), (big, big_keys)]:
        sums = SquareSums(tensors, scratch).prepare(ks, list(tensors))
        for name, dim, view in ks:
            v = tensors[name] if view is None else tensors[name].view(view)
            others = [d for d in range(v.ndim) if d != dim % v.ndim]
            ref = v.square().sum(others) if others else v.square()
            torch.testing.assert_close(sums._along[(name, dim, view)], ref, rtol=1e-13, atol=0)
        per = sums.per_tensor(list(tensors))
        torch.testing.assert_close(per, torch.stack([t.square().sum() for t in tensors.values()]),
                                   rtol=1e-13, atol=0)
