from __future__ import annotations

import math

import torch

from neurothermo.experiments._runs import problem, top_eigenvalue
from neurothermo.experiments.matrix_lr import MatrixLrConfig, adam_preconditioner
from neurothermo.runner import run_experiment


def test_top_eigenvalue_matches_the_dense_preconditioned_hessian() -> None:
    model, f = problem("smooth", 0)
    pre = adam_preconditioner(model, f, MatrixLrConfig())
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    lam = pre.diag["theta"]
    H = torch.autograd.functional.hessian(lambda t: f({"theta": t}), theta["theta"])
    root = lam.sqrt()
    ref = float(torch.linalg.eigvalsh(root[:, None] * H * root[None, :]).abs().max())
    assert math.isclose(top_eigenvalue(f, theta, dict(pre.diag), iters=300), ref, rel_tol=1e-6)
    # Adam's Λ is far from a multiple of the identity, so the identity control is a real one.
    assert float(lam.max() / lam.min()) > 1.5


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    res = run_experiment("matrix-lr", quick=True, out=tmp_path, overrides=["n_lr=3", "substeps=2"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], preds
    assert any(p["control"] for p in preds.values())
    # With the identity in place of Λ in the correction the η² error is not cancelled: slope 2, so
    # the slope-3 prediction must fail.
    res = run_experiment("matrix-lr", quick=True, out=tmp_path,
                         overrides=["n_lr=3", "substeps=2", "correction=identity"])
    main = [p for p in res.summary["predictions"] if "[correction with the identity]" in p["name"]]
    assert len(main) == 2 and not any(p["passed"] for p in main)
