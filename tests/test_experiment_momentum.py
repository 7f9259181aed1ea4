from __future__ import annotations

import torch

from neurothermo.experiments._runs import problem
from neurothermo.experiments.momentum import heavy_ball
from neurothermo.runner import run_experiment


def test_heavy_ball_is_torch_sgd_with_momentum() -> None:
    """torch's first buffer (v₁ = ∇L) makes heavy_ball exactly torch.optim.SGD(momentum=β)."""
    model, f = problem("smooth", 0)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    ours = heavy_ball(f, theta, 0.01, 0.7, 5, matched=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.7)
    for _ in range(5):
        opt.zero_grad()
        f(dict(model.named_parameters())).backward()
        opt.step()
    assert torch.allclose(ours["theta"], model.theta.detach(), rtol=0, atol=1e-14)


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    common = ["problems=smooth", "betas=0.5", "n_lr=3", "horizon=2"]
    res = run_experiment("momentum", quick=True, out=tmp_path, overrides=common)
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], preds
    assert any(p["control"] for p in preds.values())
    # Without the correction term the heavy ball is only O(η) close to the flow: slope 2 must fail.
    res = run_experiment("momentum", quick=True, out=tmp_path,
                         overrides=[*common, "correction_scale=0"])
    main = [p for p in res.summary["predictions"] if "[×0]" in p["name"]]
    assert len(main) == 1 and not main[0]["passed"]
