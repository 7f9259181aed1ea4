from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from neurothermo.experiments.noise_term import batch_grad_sq, build, draw
from neurothermo.runner import run_experiment


def test_batch_grad_sq_matches_a_naive_loop() -> None:
    """The vmapped minibatch gradient norms equal autograd on each minibatch, one at a time."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 64, dtype=torch.float64), torch.randint(10, (20,))
    for name in ("mlp", "cnn"):
        model = build(name, 0)
        idx = draw(20, 5, 3, "without", torch.Generator().manual_seed(1))
        fast = batch_grad_sq(model, x, y, idx, chunk=2)
        for k in range(3):
            g = torch.autograd.grad(F.cross_entropy(model(x[idx[k]]), y[idx[k]]),
                                    list(model.parameters()))
            ref = sum(float((gi**2).sum()) for gi in g)
            assert math.isclose(float(fast[k]), ref, rel_tol=1e-12)


def test_draw_without_replacement_has_distinct_indices() -> None:
    idx = draw(10, 10, 5, "without", torch.Generator().manual_seed(0))
    assert all(sorted(r.tolist()) == list(range(10)) for r in idx)


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    res = run_experiment("noise-term", quick=True, out=tmp_path,
                         overrides=["models=mlp", "n_data=256", "checkpoints=0,50",
                                    "batch_sizes=4,16,64", "mc_batches=150"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], preds
    assert any(p["control"] for p in preds.values())
    # Full-batch GD (every minibatch is the whole dataset, drawn without replacement) has no
    # gradient noise: the "noise term is present" prediction must then fail.
    res = run_experiment("noise-term", quick=True, out=tmp_path,
                         overrides=["models=mlp,cnn", "n_data=256", "checkpoints=0",
                                    "batch_sizes=256", "samplings=without", "mc_batches=10"])
    preds = {p["name"]: p["passed"] for p in res.summary["predictions"]}
    for name in ("mlp", "cnn"):
        assert not preds[f"{name}: the noise term is present (Stouffer z of the excesses "
                         "E‖g_B‖² − ‖∇L‖²)"]
