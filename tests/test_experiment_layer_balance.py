"""layer-balance experiment: its pieces against references, the quick run, a falsification, MNIST."""
from __future__ import annotations

import json
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
    build_model,
    charge_drift,
    load_data,
    onehot_mse,
    stationary_identity,
    whiten,
)
from neurothermo.monitor import names
from neurothermo.monitor.history import History
from neurothermo.runner import ExperimentFailed, run_experiment

# ---- pieces ---------------------------------------------------------------------------------

def test_whiten_is_the_top_k_pca_with_unit_variance() -> None:
    x, _ = load_digits(torch.float64)
    k = 16
    w = whiten(x, k)
    n = x.shape[0]
    np.testing.assert_allclose(w.mean(0).numpy(), 0, atol=1e-12)
    np.testing.assert_allclose((w.T @ w / n).numpy(), np.eye(k), atol=1e-10)
    # independent reference: the top-k eigenvectors of the covariance (numpy eigh); the whitened
    # features span exactly that subspace, so regressing x − mean on them gives its projection
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


@pytest.mark.parametrize("bias", [False, True])
def test_init_rescaling_keeps_the_function_and_moves_the_charge(bias: bool) -> None:
    cfg = LayerBalanceConfig(hidden=(8, 6), bias=bias)
    base = build_model(5, cfg, 1.0, seed=3).double()
    scaled = build_model(5, cfg, 3.0, seed=3).double()
    x = torch.randn(11, 5, dtype=torch.float64)
    torch.testing.assert_close(scaled(x), base(x), rtol=1e-5, atol=1e-6)  # float32 weights
    lin_b = [m for m in base if isinstance(m, nn.Linear)]
    lin_s = [m for m in scaled if isinstance(m, nn.Linear)]
    # first layer × s, last ÷ s; a middle layer × s (rows) ÷ s (columns): unchanged
    torch.testing.assert_close(lin_s[0].weight, 3.0 * lin_b[0].weight)
    torch.testing.assert_close(lin_s[1].weight, lin_b[1].weight)
    torch.testing.assert_close(lin_s[2].weight, lin_b[2].weight / 3.0)
    if bias:
        torch.testing.assert_close(lin_s[1].bias, 3.0 * lin_b[1].bias)
        torch.testing.assert_close(lin_s[2].bias, lin_b[2].bias)


def test_load_data_raw_pixels_and_pca() -> None:
    x, y, source = load_data(LayerBalanceConfig(pca=0))
    assert x.shape == (1797, 64) and y.shape == (1797,) and float(x.min()) == 0.0 and "digits" in source
    x, _, source = load_data(LayerBalanceConfig(pca=8))
    assert x.shape == (1797, 8) and "top 8 principal components" in source


def _history() -> tuple[History, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    n, u = 40, 5
    d = {"in": rng.uniform(0, 2, (n, u)), "out": rng.uniform(0, 2, (n, u)),
         "J": rng.normal(3, 1, (n, u)), "loss": np.linspace(2, 1, 2 * n)}
    h = History(meta={"symmetries": [{"kind": "scale", "location": "s"},
                                     {"kind": "rescale", "location": "r"}]})
    for t in range(2 * n):
        h.record(t, {names.LOSS: d["loss"][t]})
        if t % 2 == 0:
            s = t // 2
            h.record(t, {names.energy_in(1): d["in"][s], names.energy_out(1): d["out"][s],
                         names.charge(1): d["J"][s]})
    return h, d


def test_stationary_identity_and_charge_drift_match_direct_computation() -> None:
    h, d = _history()
    lr, wd = 0.1, 0.02
    r = stationary_identity(h, 1, lr, wd, window=0.5, n_blocks=4)  # last 20 recorded steps
    imb = (d["in"][20:] - d["out"][20:]).sum(1)
    pred = wd * (2 - lr * wd) * d["J"][20:].sum(1) / lr
    assert r["imbalance"] == pytest.approx(imb.mean(), rel=1e-13)
    assert r["predicted"] == pytest.approx(pred.mean(), rel=1e-13)
    blocks = (imb - pred).reshape(4, 5).mean(1)
    assert r["diff_se"] == pytest.approx(blocks.std(ddof=1) / 2, rel=1e-12)
    moved, drop = charge_drift(h, 1)
    assert moved == pytest.approx(abs(d["J"][-1].sum() - d["J"][0].sum()), rel=1e-13)
    assert drop == pytest.approx(d["loss"][0] - d["loss"][78], rel=1e-13)  # last charge at step 78


@pytest.mark.usefixtures("one_thread")
def test_gd_charge_bound_holds_for_gd_and_is_violated_by_sgd() -> None:
    """The GD control's claim |ΔJ| ≤ 2η(L₀ − L_T) must fail for SGD (whose noise moves J)."""
    cfg = LayerBalanceConfig()
    x, y, _ = load_data(cfg)
    moved = {}
    for opt in ("gd", "sgd"):
        model = build_model(x.shape[1], cfg, 1.0, seed=0)
        mon = nt.ThermoMonitor(model, onehot_mse, every=10, noise_every=None)
        h = nt.train(model, onehot_mse, (x, y), optimizer=opt, lr=cfg.lr,
                     batch_size=None if opt == "gd" else 1, steps=600, monitor=mon)
        moved[opt] = charge_drift(h, 0)
    (gd_moved, gd_drop), (sgd_moved, sgd_drop) = moved["gd"], moved["sgd"]
    assert gd_moved <= 2 * cfg.lr * gd_drop
    assert sgd_moved > 10 * 2 * cfg.lr * max(sgd_drop, 0.0)


# ---- whole runs -----------------------------------------------------------------------------

def test_quick_run_reaches_balance_and_the_controls_do_not(tmp_path: Path) -> None:
    # one start (from above: initial in/out ratio ≈ 3.7) to keep the test short
    res = run_experiment("layer-balance", quick=True, out=tmp_path, overrides=["init_scales=0.5"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], [p for p in preds.values() if not p["passed"]]
    kinds = {n.split(",")[0] for n in preds}
    assert {"layer balance", "neuron balance", "GD control", "wd control"} <= kinds
    runs = res.summary["figures"]["runs"]
    assert runs["SGD s=0.5"]["initial_pair_ratio"][0] > 2  # it really started off balance
    assert "scikit-learn digits" in res.summary["figures"]["data"]
    assert (res.path / "layer_balance.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (res.path / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {"SGD s=0.5", "GD control", "SGD + wd control"}
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_gd_in_place_of_sgd_fails_the_balance_claims(tmp_path: Path) -> None:
    res = run_experiment("layer-balance", quick=True, out=tmp_path,
                         overrides=["optimizer=gd", "init_scales=1", "steps=600", "record_every=2"])
    preds = {p["name"]: p["passed"] for p in res.summary["predictions"]}
    balance = [n for n in preds if n.startswith(("layer balance, GD", "neuron balance, GD"))]
    assert len(balance) == 3 and not any(preds[n] for n in balance), preds
    assert "GD control" in res.summary["figures"]["runs"]  # the main GD run doubles as the control


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
        f"mnist_dir={tmp_path}", "mnist_limit=120", "init_scales=1", "steps=200",
        "record_every=2", "n_blocks=4", "hidden=16"])
    fig = res.summary["figures"]
    assert fig["data"].startswith(f"MNIST (120 training images from {tmp_path})")
    assert fig["n_samples"] == 120 and fig["widths"] == [16, 16, 10]


def test_bad_settings(tmp_path: Path) -> None:
    def run(*overrides: str) -> None:
        run_experiment("layer-balance", quick=True, out=tmp_path, overrides=list(overrides))

    with pytest.raises(ConfigError, match="is not a folder"):
        run(f"mnist_dir={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="expected one of"):
        run("loss=hinge")
    with pytest.raises(ConfigError, match="must be >= 0.001"):
        run("init_scales=0")
    with pytest.raises(ConfigError, match="must be >= 1e-06"):
        run("weight_decay=0")
    with pytest.raises(ConfigError, match="repeats a start"):
        run("init_scales=1,1")
    with pytest.raises(ConfigError, match="raise steps or lower record_every"):
        run("steps=100", "record_every=10")
    with pytest.raises(ExperimentFailed, match="pca=100 exceeds the input dimension 64"):
        run("pca=100")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExperimentFailed, match="train-images-idx3-ubyte"):
        run(f"mnist_dir={tmp_path / 'empty'}")
