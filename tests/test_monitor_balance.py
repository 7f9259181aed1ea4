"""layer_balance / neuron_balance: against direct computations, and SGD reaching balance (docs/theory.md §2)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import neurothermo as nt
from neurothermo.monitor import names
from neurothermo.monitor.balance import fit_units
from neurothermo.monitor.history import History
from neurothermo.symmetry.base import ParamSlice, Symmetry


def _constructed(n: int = 40, units: int = 6, seed: int = 0) -> tuple[History, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = {"a": rng.uniform(1, 2, n), "b": rng.uniform(3, 5, n), "c": np.full(n, 2.0),
            "in": rng.uniform(0.5, 1.5, (n, units)), "out": rng.uniform(0.5, 1.5, (n, units))}
    h = History(meta={"layers": ["a", "b", "c"],
                      "symmetries": [{"kind": "scale", "location": "s"},
                                     {"kind": "rescale", "location": "a → relu → b"}]})
    for s in range(n):
        h.record(s, {names.grad_sq(k): data[k][s] for k in "abc"})
        h.record(s, {names.energy_in(1): data["in"][s], names.energy_out(1): data["out"][s]})
    return h, data


def _blocks_se(x: np.ndarray, nb: int) -> np.ndarray:
    b = x.reshape(nb, -1, *x.shape[1:]).mean(axis=1)
    return b.std(axis=0, ddof=1) / math.sqrt(nb)


def test_layer_balance_matches_direct_computation() -> None:
    h, d = _constructed()
    lb = nt.layer_balance(h, window=0.5, n_blocks=4)  # last 20 steps, blocks of 5
    assert lb.layers == ("a", "b", "c") and lb.window == (20, 39) and lb.n_steps == 20
    means = np.array([d[k][20:].mean() for k in "abc"])
    np.testing.assert_allclose(lb.sq_norm, means, rtol=1e-14)
    np.testing.assert_allclose(lb.sq_norm_se, [_blocks_se(d[k][20:], 4) for k in "abc"], rtol=1e-12)
    np.testing.assert_allclose(lb.ratio, means[:-1] / means[1:], rtol=1e-14)
    np.testing.assert_allclose(lb.residual, (means[:-1] - means[1:]) / (means[:-1] + means[1:]))
    # c is constant, so the delta method reduces to SE(b)/c for the ratio b/c
    np.testing.assert_allclose(lb.ratio_se[1], _blocks_se(d["b"][20:], 4) / 2.0, rtol=1e-12)
    # the rescale pair (symmetry 1; symmetry 0 is a scale symmetry and is skipped)
    assert lb.pairs == ("a → relu → b",)
    np.testing.assert_allclose(lb.pair_in, d["in"][20:].sum(1).mean(), rtol=1e-14)
    np.testing.assert_allclose(lb.pair_ratio, d["in"][20:].sum() / d["out"][20:].sum(), rtol=1e-13)


def test_window_as_start_step_and_without_meta() -> None:
    h, d = _constructed()
    h.meta.clear()  # e.g. rows read from a JSONL file without its meta line
    lb = nt.layer_balance(h, window=30, n_blocks=5)
    assert lb.window == (30, 39) and lb.layers == ("a", "b", "c")
    np.testing.assert_allclose(lb.sq_norm[0], d["a"][30:].mean())
    (nb,) = nt.neuron_balance(h, window=30, n_blocks=5)
    np.testing.assert_allclose(nb.energy_in, d["in"][30:].mean(0))


def test_neuron_balance_matches_direct_fits() -> None:
    h, d = _constructed(units=12)
    (nb,) = nt.neuron_balance(h, window=1.0, n_blocks=4)
    x, y = d["in"].mean(0), d["out"].mean(0)
    np.testing.assert_allclose(nb.energy_in, x, rtol=1e-14)
    np.testing.assert_allclose(nb.energy_out_se, _blocks_se(d["out"], 4), rtol=1e-12)
    assert nb.slope == pytest.approx((x @ y) / (x @ x), rel=1e-13)
    assert nb.correlation == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert nb.log_slope == pytest.approx(np.polyfit(np.log(x), np.log(y), 1)[0], rel=1e-10)
    assert nb.residual == pytest.approx(np.abs(x - y).sum() / (x + y).sum(), rel=1e-13)
    block_slopes = [fit_units(a.mean(0), b.mean(0))["slope"]
                    for a, b in zip(np.split(d["in"], 4), np.split(d["out"], 4))]
    assert nb.slope_se == pytest.approx(np.std(block_slopes, ddof=1) / 2, rel=1e-12)


def test_exact_balance_gives_diagonal() -> None:
    h = History()
    rng = np.random.default_rng(1)
    for s in range(10):
        e = rng.uniform(0.1, 3.0, 8)
        h.record(s, {names.energy_in(0): e, names.energy_out(0): e})
    (nb,) = nt.neuron_balance(h, window=1.0)
    assert nb.slope == pytest.approx(1.0, abs=1e-14) and nb.residual == 0.0
    assert nb.correlation == pytest.approx(1.0) and nb.log_slope == pytest.approx(1.0)
    assert nb.slope_se == pytest.approx(0.0, abs=1e-14)


def test_bad_input() -> None:
    h, _ = _constructed()
    with pytest.raises(ValueError, match="fraction must be in"):
        nt.layer_balance(h, window=1.5)
    with pytest.raises(TypeError, match="window"):
        nt.layer_balance(h, window="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_blocks"):
        nt.layer_balance(h, n_blocks=1)
    with pytest.raises(ValueError, match="at least 2"):
        nt.layer_balance(h, window=39)
    with pytest.raises(ValueError, match="no per-layer gradient norms"):
        nt.layer_balance(History())
    with pytest.raises(ValueError, match="no per-unit gradient energies"):
        nt.neuron_balance(History())
    dead = History()
    for s in range(4):
        dead.record(s, {names.energy_in(0): np.zeros(3), names.energy_out(0): np.ones(3)})
    with pytest.raises(ValueError, match="dead layer"):
        nt.neuron_balance(dead)


# --- theory: SGD drives an unbalanced two-layer net to gradient balance ------------------------

def _run(scale: float, optimizer: str, every: int = 4) -> History:
    """Linear net 4 → 8 → 1 on noisy linear data, hidden units rescaled by ``scale`` at init."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([0.3, -1.0, 2.0, 1.5], dtype=torch.float64)
         + 2.0 * torch.randn(256, generator=g, dtype=torch.float64)).unsqueeze(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Identity(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        model[0].weight.mul_(scale), model[0].bias.mul_(scale), model[2].weight.div_(scale)
    sym = Symmetry("rescale", "0 → 2 (8 units)", (ParamSlice("0.weight", "in", 0),
                   ParamSlice("0.bias", "in", 0), ParamSlice("2.weight", "out", 1)), 8)
    mon = nt.ThermoMonitor(model, nn.MSELoss(), symmetries=[sym], noise_every=None, every=every)
    return nt.train(model, nn.MSELoss(), (x, y), optimizer=optimizer, lr=0.02,
                    batch_size=None if optimizer == "gd" else 1, steps=1000, monitor=mon)


@pytest.mark.usefixtures("one_thread")
def test_sgd_reaches_neuron_balance_from_both_sides_gd_does_not() -> None:
    runs = {s: _run(s, "sgd") for s in (0.4, 2.5)}
    for scale, h in runs.items():
        first = nt.layer_balance(h, window=0.5, n_blocks=10)
        early = h[names.energy_in(0)][:12].sum() / h[names.energy_out(0)][:12].sum()
        # the init is unbalanced on opposite sides (in-energy ∝ scale⁻², out-energy ∝ scale²) ...
        assert (early > 2) if scale < 1 else (early < 0.6)
        # ... and SGD's stationary state is balanced: E[in] = E[out] (docs/theory.md §2). The window
        # means are ≈ normal with the batch-means SE; 3 SE bounds a false failure by 0.3 %.
        (nb,) = nt.neuron_balance(h, window=0.5, n_blocks=10)
        assert abs(first.pair_ratio[0] - 1) < 3 * first.pair_ratio_se[0]
        assert abs(nb.slope - 1) < 3 * nb.slope_se
        assert nb.correlation is not None and nb.correlation > 0.9
    # the entropic force picks one point of the orbit whatever the start: the charges meet
    j_small, j_large = (runs[s][names.charge(0)] for s in (0.4, 2.5))
    assert abs(j_small[0].sum() - j_large[0].sum()) > 15
    assert abs(j_small[-1].sum() - j_large[-1].sum()) < 0.05 * abs(j_small[0].sum() - j_large[0].sum())
    # control: full-batch GD (no noise) barely moves the charge from its unbalanced value
    gd = _run(2.5, "gd", every=999)[names.charge(0)]  # records steps 0 and 999
    sgd_move = abs(j_large[-1].sum() - j_large[0].sum())
    assert abs(gd[-1].sum() - gd[0].sum()) < 0.05 * sgd_move
