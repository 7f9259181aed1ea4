from __future__ import annotations

import math

import torch

from neurothermo.experiments.scale_invariance import ScaleInvarianceConfig, net, sgd_chains
from neurothermo.runner import run_experiment


def test_chain_step_is_torch_sgd_with_weight_decay() -> None:
    """One vectorised step equals torch.optim.SGD(weight_decay=wd) on the same batch (torch's wd)."""
    cfg = ScaleInvarianceConfig(steps=1, d=3, hidden=2, batch_size=5)
    g0 = torch.Generator().manual_seed(0)
    u = torch.randn(2, generator=g0, dtype=torch.float64)
    teacher = torch.randn(1, 2, 3, generator=g0, dtype=torch.float64)
    W0 = torch.randn(1, 2, 3, generator=g0, dtype=torch.float64)
    lr, wd = torch.tensor([0.3, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.0], dtype=torch.float64)
    ch = sgd_chains(cfg, lr, wd, torch.Generator().manual_seed(1), W0, u, teacher)
    gen = torch.Generator().manual_seed(1)   # replay the draws
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    y = net(teacher.expand(2, -1, -1), u, x) + torch.randn(2, 5, generator=gen, dtype=torch.float64)
    for c in range(2):
        W = torch.nn.Parameter(W0[0].clone())
        opt = torch.optim.SGD([W], lr=float(lr[c]), weight_decay=float(wd[c]))
        loss = (0.5 * (net(W[None], u, x[c:c + 1]) - y[c:c + 1]) ** 2).mean()
        loss.backward()
        # the gradient is orthogonal to W (scale invariance), to round-off
        assert abs(float((W.grad * W.detach()).sum())) < 1e-14 * float(W.grad.norm() * W.detach().norm())
        opt.step()
        assert math.isclose(float(W.detach().pow(2).sum()), float(ch.norm_sq[1, c]), rel_tol=1e-13)


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    res = run_experiment("scale-invariance", quick=True, out=tmp_path,
                         overrides=["steps=4000", "lrs=0.1,0.2", "wds=0.05,0.1"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], preds
    assert any(p["control"] for p in preds.values())
    # η → 0 is gradient flow: the norm does not relax in the run's time, so the stationary law
    # E‖W‖² = η·E‖g‖²/(wd(2 − η·wd)) and the (η/wd)^¼ scaling must fail.
    res = run_experiment("scale-invariance", quick=True, out=tmp_path,
                         overrides=["steps=2000", "lrs=0.0001,0.0002", "wds=0.02,0.05"])
    preds = {p["name"]: p["passed"] for p in res.summary["predictions"]}
    assert not preds["E‖W‖² = η·E‖g‖²/(wd(2 − η·wd)) at every grid point (max |z|, batch means)"]
    assert not preds["‖W‖ ∝ (η/wd)^slope over the grid"]
    assert preds["control: gradient flow keeps ‖W‖² (relative change)"]
