from __future__ import annotations

import pytest
import torch

from neurothermo.experiments._mlp_chains import forward, init_mlp, mse_step
from neurothermo.runner import run_experiment


def _reference(params, c, act):
    layers = []
    for k, (W, b) in enumerate(params):
        lin = torch.nn.Linear(W.shape[2], W.shape[1], dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(W[c])
            lin.bias.copy_(b[c, 0])
        layers.append(lin)
        if k < len(params) - 1:
            layers.append(torch.nn.Tanh() if act == "tanh" else torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_batched_step_is_one_independent_sgd_step_per_chain(act) -> None:
    g = torch.Generator().manual_seed(0)
    params = init_mlp((3, 5, 4, 2), 3, 1.0, g)
    params = [(W, torch.randn(b.shape, generator=g, dtype=torch.float64)) for W, b in params]
    x = torch.randn(3, 6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    out, hs = forward(params, x, act)
    new = mse_step(params, x, y, act, 0.1)
    for c in range(3):
        net = _reference(params, c, act)
        torch.testing.assert_close(out[c], net(x[c]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hs[-1][c], net[:-1](x[c]), rtol=1e-12, atol=1e-12)
        loss = 0.5 * (net(x[c]) - y[c]).square().sum(-1).mean()  # (1/(2n)) Σ ‖f − y‖²
        loss.backward()
        for (W, b), lin in zip(new, [m for m in net if isinstance(m, torch.nn.Linear)]):
            torch.testing.assert_close(W[c], lin.weight - 0.1 * lin.weight.grad, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b[c, 0], lin.bias - 0.1 * lin.bias.grad, rtol=1e-12, atol=1e-12)


def test_quick_run_sgd_beats_gd_and_init_and_the_controls_do_not(tmp_path) -> None:
    res = run_experiment("platonic-nonlinear", quick=True, out=tmp_path)
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], [p for p in preds.values() if not p["passed"]]
    diffs = res.summary["figures"]["paired_differences"]
    z = {k: v["mean"] / v["se"] for k, v in diffs.items()}
    # the same test ("gain ≥ 3 s.e.") holds for label-noise SGD and fails without label noise
    assert z["SGD − GD"] >= 3 and z["SGD − init"] >= 3
    assert z["SGD, no label noise − GD"] < 3
    # untrained control: a learning rate too small to move the nets leaves SGD at the init
    slow = run_experiment("platonic-nonlinear", quick=True, out=tmp_path,
                          overrides=["steps=200", "lr_start=1e-6", "lr_end=1e-6", "gd_steps=5",
                                     "chains=4", "test_samples=100"])
    verdict = {p["name"]: p["passed"] for p in slow.summary["predictions"]}
    assert not verdict["SGD above init: mean cross-network CKA gain ≥ 3 s.e."]
    assert not verdict["SGD above GD: mean cross-network CKA gain ≥ 3 s.e."]


def test_bad_settings_are_refused() -> None:
    from neurothermo.config import ConfigError

    with pytest.raises(ConfigError, match="widths_b must start and end with the data dimension 4"):
        run_experiment("platonic-nonlinear", quick=True, overrides=["widths_b=4,8"])
    with pytest.raises(ConfigError, match="sigma_eps is all zero"):
        run_experiment("platonic-nonlinear", quick=True, overrides=["sigma_eps=0,0,0,0"])
