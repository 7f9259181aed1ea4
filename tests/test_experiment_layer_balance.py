"""layer-balance: the drift identity against a hand-written SGD loop, the pieces, whole runs, controls."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import neurothermo as nt
from neurothermo.config import ConfigError
from neurothermo.data import load_digits
from neurothermo.experiments.layer_balance import (
    LayerBalanceConfig,
    NoisyLabels,
    activity,
    build_model,
    load_data,
    make_activation,
    onehot_mse,
    whiten,
)
from neurothermo.experiments.layer_balance_checks import R_MIN, Z, unit_z, unit_z_limit
from neurothermo.monitor.drift import charge_drift, relaxation_count
from neurothermo.runner import ExperimentFailed, run_experiment

# ---- pieces ---------------------------------------------------------------------------------

def test_whiten_is_the_top_k_pca_with_unit_variance() -> None:
    x, _ = load_digits(torch.float64)
    k = 16
    w = whiten(x, k)
    n = x.shape[0]
    np.testing.assert_allclose(w.mean(0).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose((w.T @ w / n).numpy(), np.eye(k), atol=1e-10)
    # independent reference: the top-k eigenvectors of the covariance (numpy eigh)
    xc = (x - x.mean(0)).numpy()
    _, vecs = np.linalg.eigh(xc.T @ xc / n)
    proj = vecs[:, -k:] @ vecs[:, -k:].T
    wn = w.numpy()
    fitted = wn @ np.linalg.lstsq(wn, xc, rcond=None)[0]
    np.testing.assert_allclose(fitted, xc @ proj, atol=1e-9)


def test_whiten_bad_input() -> None:
    x, _ = load_digits()
    with pytest.raises(ValueError, match="exceeds the input dimension 64"):
        whiten(x, 65)
    with pytest.raises(ValueError, match="directions of nonzero variance; lower pca"):
        whiten(x, 64)  # digits has constant (always blank) border pixels


def test_onehot_mse_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 10, generator=g, dtype=torch.float64)
    y = torch.randint(10, (7,), generator=g)
    ref = nn.MSELoss(reduction="sum")(f, nn.functional.one_hot(y, 10).double()) / (2 * 7)
    torch.testing.assert_close(onehot_mse(f, y), ref, rtol=1e-15, atol=0)


def test_noisy_labels_flip_rate_expectation_and_reproducibility() -> None:
    g = torch.Generator().manual_seed(1)
    n, c, p = 20_000, 10, 0.3
    f = torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(c, (n,), generator=g)
    seen: list[torch.Tensor] = []
    noisy = NoisyLabels(lambda out, t: (seen.append(t), onehot_mse(out, t))[1], p, c)
    torch.manual_seed(0)
    a = noisy(f, y)
    torch.manual_seed(0)
    assert float(noisy(f, y)) == float(a)  # torch's global RNG, which nt.train seeds: reproducible
    changed = float((seen[0] != y).double().mean())
    q = p * (1 - 1 / c)  # a replacement draws the true class with probability 1/C
    assert abs(changed - q) < 4 * (q * (1 - q) / n) ** 0.5  # binomial SE, 4σ
    assert float(NoisyLabels(onehot_mse, 0.0, c)(f, y)) == float(onehot_mse(f, y))
    # expectation: ½‖f − E t‖² + ½E‖t − E t‖² with E t = (1 − p)·onehot + p/C (closed form per sample)
    et = nn.functional.one_hot(y, c).double() * (1 - p) + p / c
    var = (1 - p + p / c) * (1 - (1 - p + p / c)) + (c - 1) * (p / c) * (1 - p / c)
    expected = 0.5 * (f - et).pow(2).sum(1).mean() + 0.5 * var
    per_sample = 0.5 * (f - nn.functional.one_hot(seen[0], c).double()).pow(2).sum(1)
    assert abs(float(a) - float(expected)) < 4 * float(per_sample.std()) / n ** 0.5


def test_init_rescaling_keeps_the_function_and_scales_activations() -> None:
    base = build_model([5, 8, 6, 3], True, 1.0, seed=3)
    scaled = build_model([5, 8, 6, 3], True, 3.0, seed=3)
    assert all(p.dtype == torch.float64 for p in scaled.parameters())
    x = torch.randn(11, 5, dtype=torch.float64)
    torch.testing.assert_close(scaled(x), base(x), rtol=1e-12, atol=1e-12)
    lb = [m for m in base if isinstance(m, nn.Linear)]
    ls = [m for m in scaled if isinstance(m, nn.Linear)]
    torch.testing.assert_close(ls[0].weight, 3.0 * lb[0].weight)
    torch.testing.assert_close(ls[1].weight, lb[1].weight)  # × s on rows, ÷ s on columns
    torch.testing.assert_close(ls[1].bias, 3.0 * lb[1].bias)
    torch.testing.assert_close(ls[2].weight, lb[2].weight / 3.0)
    torch.testing.assert_close(ls[2].bias, lb[2].bias)
    assert activity(scaled, x) == activity(base, x)  # same active sets, activations × s


def test_activations_are_homogeneous_and_keep_the_init() -> None:
    x = torch.randn(9, 5, dtype=torch.float64)
    base = build_model([5, 8, 6, 3], True, 1.0, seed=2, activation="abs")
    for spec, ref in (("relu", torch.relu), ("abs", torch.abs),
                      ("leaky_relu:0.3", lambda z: torch.where(z > 0, z, 0.3 * z))):
        act = make_activation(spec)
        z = torch.randn(50, dtype=torch.float64)
        torch.testing.assert_close(act(z), ref(z), rtol=0, atol=0)
        torch.testing.assert_close(act(2.5 * z), 2.5 * act(z), rtol=1e-15, atol=0)  # positively homogeneous
        m = build_model([5, 8, 6, 3], True, 1.0, seed=2, activation=spec)
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), base.parameters()))  # same init
        scaled = build_model([5, 8, 6, 3], True, 3.0, seed=2, activation=spec)
        torch.testing.assert_close(scaled(x), m(x), rtol=1e-12, atol=1e-12)  # rescaling keeps f
        syms = nt.find_symmetries(m, x)
        assert sorted(s.n_units for s in syms if s.kind == "rescale") == [6, 8], spec
    with pytest.raises(ValueError, match="is not one of"):
        make_activation("leaky_relu:-0.1")


def test_load_data_raw_pixels_and_pca() -> None:
    x, y, source = load_data(LayerBalanceConfig(pca=0))
    assert x.shape == (1797, 64) and x.dtype == torch.float64 and float(x.min()) == 0.0
    assert "digits" in source and y.shape == (1797,)
    x, _, source = load_data(LayerBalanceConfig(pca=8))
    assert x.shape == (1797, 8) and "top 8 principal components" in source


def test_unit_z_and_its_limit() -> None:
    z = unit_z(np.array([0.3, 0.0, 0.2, -1.0]), np.array([0.1, 0.0, 0.0, 0.5]))
    assert z[0] == pytest.approx(3.0) and z[1] == 0.0 and z[2] == np.inf and z[3] == pytest.approx(2.0)
    from scipy import stats

    # one unit: the two-sided 0.27 % Student-t quantile; more units: Bonferroni, larger
    assert unit_z_limit(1, 10) == pytest.approx(stats.t.ppf(1 - 0.00135, 9))
    assert unit_z_limit(16, 10) > unit_z_limit(1, 10) > 3.0


# ---- the drift identity against an independent loop -------------------------------------------

def _manual(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, lrs: list[float], wd: float,
            order: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain SGD by hand: per step and unit of the first hidden layer, J and e_in − e_out."""
    l0, l1 = model[0], model[2]
    js, imb = [], []
    for lr, idx in zip(lrs, order):
        with torch.no_grad():
            js.append((l0.weight.pow(2).sum(1) + l0.bias.pow(2) - l1.weight.pow(2).sum(0)).numpy().copy())
        model.zero_grad()
        onehot_mse(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            e_in = l0.weight.grad.pow(2).sum(1) + l0.bias.grad.pow(2)
            imb.append((e_in - l1.weight.grad.pow(2).sum(0)).numpy().copy())
            for p in model.parameters():
                p.sub_(lr * (p.grad + wd * p))
    with torch.no_grad():
        j_end = (l0.weight.pow(2).sum(1) + l0.bias.pow(2) - l1.weight.pow(2).sum(0)).numpy()
    return np.array(js), np.array(imb), j_end


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_charge_drift_matches_a_hand_written_loop_and_the_identity_is_exact(wd: float) -> None:
    x, y, _ = load_data(LayerBalanceConfig(pca=6))
    widths, steps, start = [6, 5, 4, 10], 60, 20
    sched = [1.0 if t < 40 else 0.5 for t in range(steps)]  # a changing η: the η²-weighted form
    model = build_model(widths, True, 0.7, seed=1)
    mon = nt.ThermoMonitor(model, onehot_mse, every=1, noise_every=None)
    h = nt.train(model, onehot_mse, (x, y), lr=0.2, batch_size=3, steps=steps, weight_decay=wd,
                 lr_schedule=lambda t: sched[t], seed=5, monitor=mon)
    d = charge_drift(h, window=(start, steps - 1), n_blocks=4)[0]
    # reference: same start, same batches (nt.train's data order), a loop written out by hand
    gen = torch.Generator().manual_seed(5)
    order, perm, pos = [], torch.randperm(x.shape[0], generator=gen), 0
    for _ in range(steps):
        order.append(perm[pos:pos + 3])
        pos += 3
    ref_model = build_model(widths, True, 0.7, seed=1)
    lrs = [0.2 * f for f in sched]
    js, imb, j_end = _manual(ref_model, x, y, lrs, wd, order)
    lr2 = np.array(lrs[start:]) ** 2
    w = lr2.sum()
    np.testing.assert_allclose(d.imbalance, (lr2[:, None] * imb[start:]).sum(0) / w, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(d.drift, (j_end - js[start]) / w, rtol=1e-10, atol=1e-13)
    c = (1 - np.sqrt(lr2) * wd) ** 2
    np.testing.assert_allclose(d.decay, ((1 - c)[:, None] * js[start:]).sum(0) / w, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d.charge, js[start:].mean(0), rtol=1e-10)
    # the identity itself, to round-off (float64): far below the bound, and the bound is tiny
    assert d.error <= d.roundoff < 1e-9 * max(1.0, float(np.abs(d.imbalance).max()))
    assert np.abs(d.imbalance).max() > 1e3 * d.roundoff  # the imbalance itself is not round-off


def test_relaxation_count_matches_a_hand_written_loop() -> None:
    """R = Σ_{t < window} η_t²(Σe_in + Σe_out)/S per pair, from the monitor's history, against plain
    SGD written out by hand (same batches; e and S at the parameters the step's gradient is taken
    at); GD's vanishing gradients give a far smaller R than SGD's noise over the same steps."""
    x, y, _ = load_data(LayerBalanceConfig(pca=6))
    widths, steps = [6, 5, 4, 10], 60
    sched = [1.0 if t < 40 else 0.5 for t in range(steps)]
    model = build_model(widths, True, 0.7, seed=1)
    mon = nt.ThermoMonitor(model, onehot_mse, every=1, noise_every=None)
    h = nt.train(model, onehot_mse, (x, y), lr=0.2, batch_size=3, steps=steps,
                 lr_schedule=lambda t: sched[t], seed=5, monitor=mon)
    got = relaxation_count(h, window=0.25)  # window: the last 15 of 60 steps
    gen = torch.Generator().manual_seed(5)
    perm, order = torch.randperm(x.shape[0], generator=gen), []
    for t in range(steps):
        order.append(perm[3 * t:3 * t + 3])
    ref = build_model(widths, True, 0.7, seed=1)
    lins = [ref[0], ref[2], ref[4]]
    want = [0.0, 0.0]
    for t, idx in enumerate(order):
        lr = 0.2 * sched[t]
        ref.zero_grad()
        onehot_mse(ref(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for k in range(2):  # pair k: in = layer k (weights and bias), out = layer k + 1 (weights)
                a, b = lins[k], lins[k + 1]
                e = a.weight.grad.pow(2).sum() + a.bias.grad.pow(2).sum() + b.weight.grad.pow(2).sum()
                gross = sum(p.pow(2).sum() for p in (*a.parameters(), *b.parameters()))
                if t < steps - 15:
                    want[k] += float(lr**2 * e / gross)
            for p in ref.parameters():
                p.sub_(lr * p.grad)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # no noise: the same start under full-batch GD relaxes its orbits far less (ḡ ≪ g_B)
    model = build_model(widths, True, 0.7, seed=1)
    mon = nt.ThermoMonitor(model, onehot_mse, every=1, noise_every=None)
    h_gd = nt.train(model, onehot_mse, (x, y), optimizer="gd", lr=0.2, steps=steps, monitor=mon)
    assert all(g < r for g, r in zip(relaxation_count(h_gd, window=0.25), got))


def test_float32_breaks_the_float64_round_off_bound() -> None:
    """'To round-off' is not vacuous: float32 arithmetic misses the identity by far more."""
    x, y, _ = load_data(LayerBalanceConfig(pca=8))
    errs = {}
    for dt in (torch.float64, torch.float32):
        model = build_model([8, 16, 16, 10], True, 0.5, seed=0).to(dt)
        mon = nt.ThermoMonitor(model, onehot_mse, every=1, noise_every=None)
        h = nt.train(model, onehot_mse, (x.to(dt), y), lr=0.1, batch_size=1, steps=400, monitor=mon)
        errs[dt] = charge_drift(h, window=0.5, n_blocks=4)
    for d64, d32 in zip(errs[torch.float64], errs[torch.float32]):
        assert d64.error <= d64.roundoff
        assert d32.error > 100 * d64.roundoff


def test_charge_drift_needs_every_step() -> None:
    x, y, _ = load_data(LayerBalanceConfig(pca=6))
    model = build_model([6, 5, 10], False, 1.0, seed=0)
    mon = nt.ThermoMonitor(model, onehot_mse, every=2, noise_every=None)
    h = nt.train(model, onehot_mse, (x, y), lr=0.1, batch_size=2, steps=40, monitor=mon)
    with pytest.raises(ValueError, match=r"record with ThermoMonitor\(every=1\)"):
        charge_drift(h)
    model = build_model([6, 5, 10], False, 1.0, seed=0)
    mon = nt.ThermoMonitor(model, onehot_mse, every=1, noise_every=None)
    with pytest.warns(nt.MonitorWarning, match="not plain SGD"):
        h = nt.train(model, onehot_mse, (x, y), optimizer="momentum", momentum=0.9, lr=0.1,
                     batch_size=2, steps=20, monitor=mon)
    with pytest.raises(ValueError, match="plain SGD steps only"):
        charge_drift(h)


# ---- whole runs -----------------------------------------------------------------------------

FAST = ["steps=1500", "ref_steps=3000", "balance_losses=mse"]


def _preds(res: object) -> dict[str, dict[str, object]]:
    return {p["name"]: p for p in res.summary["predictions"]}  # type: ignore[attr-defined]


def test_run_identity_at_depth_reference_balance_wd_law_and_controls(tmp_path: Path) -> None:
    res = run_experiment("layer-balance", quick=True, out=tmp_path, overrides=FAST)
    preds = _preds(res)
    assert res.summary["all_passed"], [p for p in preds.values() if not p["passed"]]
    runs = res.summary["figures"]["runs"]
    # every pair of the deep (2 hidden layers, biases) MSE and CE runs obeys the identity
    for k in ("deep MSE", "deep CE", "deep + wd"):
        assert len(runs[k]["pairs"]) == 2
        ident = [n for n in preds if n.startswith(f"drift identity, {k},")]
        assert len(ident) == 2
    # the deep + wd run passes the stationary law per pair and per neuron, at every pair
    assert len([n for n in preds if n.startswith("wd law per neuron, deep + wd")]) == 2
    # the controls fail the balance claim the reference passes: their orbits never relax (the
    # premise R ≥ 3), whatever ratio GD's last gradients have (measured: 1.001 in one seed); the
    # small-η control's ratio stays far off as well
    for k in ("GD control", "small-η control"):
        assert runs[k]["relaxation_times"][0] < R_MIN, k
        assert runs[k]["identity_error"][0] <= runs[k]["roundoff_bound"][0]  # the identity still holds
    assert runs["GD control"]["relaxation_times"][0] < 0.1  # no noise: ḡ vanishes as GD converges
    assert runs["reference"]["relaxation_times"][0] >= R_MIN
    r, se = runs["reference"]["pair_ratio"][0], runs["reference"]["pair_ratio_se"][0]
    assert abs(r - 1) <= Z * se
    # the reference really started off balance and the wd law is not the wd = 0 balance
    assert runs["small-η control"]["pair_ratio"][0] > 2
    assert all(abs(v - 1) > Z * s for v, s in zip(runs["deep + wd"]["pair_ratio"],
                                                   runs["deep + wd"]["pair_ratio_se"]))
    # a deep (2 hidden layers) biased |x| network balances every pair and every neuron after
    # ≥ 3 orbit relaxation times; its GD and small-η controls never relax, and the ReLU deep runs
    # fail the ratio (their units sparsify)
    bal = runs["balance MSE"]
    assert bal["activation"] == "abs" and bal["label_noise"] == 0.1 and len(bal["pairs"]) == 2
    for i in range(2):
        assert abs(bal["pair_ratio"][i] - 1) <= Z * bal["pair_ratio_se"][i]
        assert abs(bal["neuron_slope"][i] - 1) <= Z * bal["neuron_slope_se"][i]
        assert bal["identity_error"][i] <= bal["roundoff_bound"][i]
        assert bal["relaxation_times"][i] >= R_MIN
        for k in ("balance GD control", "balance small-η control"):
            assert runs[k]["relaxation_times"][i] < R_MIN, (k, i)
        r, se = runs["deep MSE"]["pair_ratio"][i], runs["deep MSE"]["pair_ratio_se"][i]
        assert abs(r - 1) > Z * se, (i, r, se)  # ReLU: its units sparsify and drag the balance point
    assert bal["accuracy_end"] > 0.5  # it learns (10 classes: chance 0.1)
    assert len([n for n in preds if n.startswith("neuron balance, balance MSE")]) == 2
    assert (res.path / "layer_balance.png").stat().st_size > 20_000


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_mnist_folder_is_used(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 150)
    images = rng.integers(0, 60, (150, 28, 28)) + 150 * (np.arange(28)[None, :, None] // 3
                                                         == labels[:, None, None])
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    res = run_experiment("layer-balance", quick=True, out=tmp_path / "runs", overrides=[
        f"mnist_dir={tmp_path}", "mnist_limit=120", "steps=200", "ref_steps=200", "wd_steps=400",
        "weight_decay=0.2",
        "n_blocks=4", "hidden=8,8", "ref_hidden=8", "losses=mse", "label_noise=0.3",
        "balance_losses=mse", "balance_steps=200", "activation=leaky_relu:0.2"])
    fig = res.summary["figures"]
    deep = fig["runs"]["deep MSE"]
    assert deep["label_noise"] == 0.3 and fig["runs"]["reference"]["label_noise"] == 0.0
    # fresh label noise changes the gradients, not the symmetry: the identity stays exact
    assert all(e <= b for e, b in zip(deep["identity_error"], deep["roundoff_bound"]))
    assert deep["activation"] == "leaky_relu:0.2" and fig["runs"]["balance MSE"]["activation"] == "abs"
    assert fig["data"].startswith(f"MNIST (120 training images from {tmp_path})")
    assert fig["n_samples"] == 120 and fig["deep_widths"] == [16, 8, 8, 10]
    assert set(fig["runs"]) == {"deep MSE", "reference", "GD control", "small-η control", "deep + wd",
                                "balance MSE", "balance GD control", "balance small-η control"}


def test_bad_settings(tmp_path: Path) -> None:
    def run(*overrides: str) -> None:
        run_experiment("layer-balance", quick=True, out=tmp_path, overrides=list(overrides))

    with pytest.raises(ConfigError, match="is not a folder"):
        run(f"mnist_dir={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="expected one of"):
        run("losses=hinge")
    with pytest.raises(ConfigError, match="list 'mse' and/or 'ce' once each"):
        run("losses=mse,mse")
    with pytest.raises(ConfigError, match="balance_losses=.*once each"):
        run("balance_losses=ce,ce")
    for bad in ("activation=tanh", "activation=leaky_relu:1.5", "balance_activation=leaky_relu:x",
                "activation=abs:2"):
        with pytest.raises(ConfigError, match=r"is not one of 'relu', 'leaky_relu:<slope>'"):
            run(bad)
    with pytest.raises(ConfigError, match="2 to 4 hidden layers"):
        run("hidden=16")
    with pytest.raises(ConfigError, match="must be >= 0.001"):
        run("init_scale=0")
    with pytest.raises(ConfigError, match="raise steps or lower n_blocks"):
        run("steps=100", "n_blocks=20")
    with pytest.raises(ConfigError, match=r"relaxes in τ = 1/\(η·wd\(2 − η·wd\)\) = 500 steps"):
        run("wd_steps=2000")
    with pytest.raises(ExperimentFailed, match="pca=100 exceeds the input dimension 64"):
        run("pca=100")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExperimentFailed, match="train-images-idx3-ubyte"):
        run(f"mnist_dir={tmp_path / 'empty'}")


class _Recorder:
    """The part of RunContext that the checks use: predictions, recorded."""

    def __init__(self) -> None:
        self.preds: dict[str, object] = {}

    def predict(self, name: str, measured: float, predicted: float, tolerance: float,
                **kw: object) -> object:
        from neurothermo.experiments.base import Prediction
        p = Prediction.check(name, measured, predicted, tolerance, **kw)  # type: ignore[arg-type]
        self.preds[name] = p
        return p


def _wd_pair(decay: float, imbalance: float, se: float) -> object:
    from types import SimpleNamespace
    units = np.full(4, se)
    return SimpleNamespace(location="0 → 1 → 2", pair_decay=decay, pair_imbalance=imbalance,
                           pair_drift_se=se, drift=np.zeros(4), drift_se=units, n_blocks=10)


@pytest.mark.parametrize(("decay", "resolved"), [(0.494, True), (-0.0037, False), (0.0, False)])
def test_wd_law_on_a_decayed_network_fails_its_premise(decay: float, resolved: bool) -> None:
    # A pair whose weights decayed away has ⟨e_in − e_out⟩ ≈ 0 ≈ the law's prediction: the law
    # "passes" as 0 = 0, so its premise (the prediction resolved from 0 by 3 SE) must fail there.
    # Numbers: the quick preset's first pair (0.494, SE 0.018) and a 4-hidden-layer run whose
    # wd = 0.01 killed every unit (prediction −0.0037 with 3 SE = 0.0038, measured 1.6e-16).
    from types import SimpleNamespace

    from neurothermo.experiments.layer_balance_checks import check_wd
    ctx = _Recorder()
    measured = decay if resolved else 1.6e-16
    lb = SimpleNamespace(pairs=["0 → 1 → 2"], pair_ratio=np.array([1.5]), pair_ratio_se=np.array([0.01]))
    check_wd(ctx, {"drift": [_wd_pair(decay, measured, 0.0038 / Z)], "lb": lb}, ())  # type: ignore[arg-type]
    premise = next(p for n, p in ctx.preds.items() if n.startswith("wd law premise"))
    law = next(p for n, p in ctx.preds.items() if n.startswith("wd law, deep + wd"))
    assert premise.passed is resolved  # type: ignore[attr-defined]
    assert law.passed  # type: ignore[attr-defined]  # the law alone cannot tell the two apart
