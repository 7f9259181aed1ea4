from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

import neurothermo as nt
from neurothermo.experiments._runs import digits_subset, problem, top_eigenvalue
from neurothermo.experiments.matrix_lr import MatrixLrConfig, adam_preconditioner
from neurothermo.experiments.matrix_lr_drift import (
    expected_batch_force,
    reshuffled_epochs,
    train_with_adam,
)
from neurothermo.models import mlp
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


def _digits_mlp(n: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    x, y = digits_subset(n, seed)
    torch.manual_seed(seed)
    return mlp([64, 5, 10], "tanh").double(), x, y


def test_expected_batch_force_is_the_mean_over_every_batch_without_replacement() -> None:
    """(1 − f)F(all) + f·mean_i F(i) against the plain average of the Λ-force over all C(N, b) batches."""
    model, x, y = _digits_mlp(7)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    pre = nt.Preconditioner({k: torch.rand(v.shape, generator=gen, dtype=v.dtype) * 5 + 0.1
                             for k, v in theta.items()}, lr=0.1)

    def objective(idx: torch.Tensor):
        return lambda p: F.cross_entropy(functional_call(model, p, (x[idx],)), y[idx])

    for b, lam in ((3, pre), (2, None)):
        subsets = list(itertools.combinations(range(7), b))
        ref = {k: torch.zeros_like(v) for k, v in theta.items()}
        for s in subsets:
            f = nt.functional_entropic_force(objective(torch.tensor(s)), theta, lr=0.1,
                                             preconditioner=lam)
            for k in ref:
                ref[k] += f[k] / len(subsets)
        got = expected_batch_force(objective, 7, b, theta, 0.1, lam)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-14)


def test_vectorised_epochs_match_torch_adam_and_a_plain_preconditioned_loop() -> None:
    n, b, lr = 24, 6, 3e-3
    model, x, y = _digits_mlp(n)
    point = train_with_adam(model, x, y, steps=5, lr=0.01, batch=b, seed=1)
    zero = {k: torch.zeros_like(v) for k, v in point.theta.items()}
    perm = torch.argsort(torch.rand(1, n, generator=torch.Generator().manual_seed(9)), dim=1)[0]
    # the same Adam, continued by torch on the same batches
    twin, _, _ = _digits_mlp(n)
    opt = torch.optim.Adam(twin.parameters(), lr=0.01, betas=(0.0, 0.999))
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randint(0, n, (b,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(twin(x[idx]), y[idx]).backward()
        opt.step()
    for group in opt.param_groups:
        group["lr"] = lr
    sgd = {k: v.clone() for k, v in point.theta.items()}
    for k in range(n // b):
        idx = perm[k * b:(k + 1) * b]
        opt.zero_grad()
        F.cross_entropy(twin(x[idx]), y[idx]).backward()
        opt.step()
        leaves = {nm: v.detach().requires_grad_(True) for nm, v in sgd.items()}
        g = torch.autograd.grad(F.cross_entropy(functional_call(model, leaves, (x[idx],)), y[idx]),
                                list(leaves.values()))
        sgd = {nm: (v - lr * point.pre.diag[nm] * gi).detach()
               for (nm, v), gi in zip(leaves.items(), g)}
    want_adam = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
    want_sgd = torch.cat([v.reshape(-1) for v in sgd.values()])
    got_adam = reshuffled_epochs(point, lr, b, 1, zero, 9, adam=True)
    got_sgd = reshuffled_epochs(point, lr, b, 1, zero, 9)
    torch.testing.assert_close(got_adam.mean, want_adam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_sgd.mean, want_sgd, rtol=1e-12, atol=1e-12)


QUICK = ["n_lr=3", "substeps=2", "drift_replicates=2000"]


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    res = run_experiment("matrix-lr", quick=True, out=tmp_path, overrides=QUICK)
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], preds
    assert any(p["control"] for p in preds.values())
    # With the identity in place of Λ in the correction the η² error is not cancelled: slope 2, so
    # the slope-3 prediction must fail.
    assert any(p["control"] and p["name"].startswith("drift") for p in preds.values())
    res = run_experiment("matrix-lr", quick=True, out=tmp_path, overrides=[*QUICK, "correction=identity"])
    main = [p for p in res.summary["predictions"] if "[correction with the identity]" in p["name"]]
    assert len(main) == 2 and not any(p["passed"] for p in main)
    # The drift of the Adam-preconditioned epoch against T·Λ·F_I (the plain entropic force in place
    # of the one in Λ-geometry): its size is off by the scale of Λ, so the prediction must fail.
    drift = {p["name"]: p for p in res.summary["predictions"]
             if "[identity in place of Λ]" in p["name"]}
    assert len(drift) == 2
    size = next(p for name, p in drift.items() if "size" in name)
    assert not size["passed"] and size["measured"] > 1 + 5 * size["tolerance"]
