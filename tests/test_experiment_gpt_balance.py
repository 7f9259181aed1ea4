"""gpt-balance: charge orientation against Conv1D weights, the identity's round-off bound and its
sensitivity, the law on a synthetic process, whole runs and the two controls (main predictions fail)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import neurothermo as nt
from neurothermo.experiments import _char_lm as lm
from neurothermo.experiments import _gpt_balance_checks as ck
from neurothermo.experiments import _gpt_balance_train as tr
from neurothermo.experiments._gpt_balance_laws import KEPT_MAX
from neurothermo.runner import run_experiment

D, H = 16, 2
DH = D // H


@pytest.fixture(scope="module")
def gpt() -> tuple[torch.nn.Module, list[nt.Symmetry], lm.CharData]:
    data = lm.CharData.from_docs(lm.docstring_corpus())
    model = tr.build_gpt(len(data.vocab), D, 1, H, 16, 0, torch.float64)
    with torch.no_grad():  # non-zero biases, so the bias rows of the charges are tested too
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    x = lm.windows(data.train, 4, 16, torch.Generator().manual_seed(0))
    return model, nt.find_symmetries(model, x, progress=False), data


def _by_family(syms: list[nt.Symmetry], fam: str) -> nt.Symmetry:
    return next(s for s in syms if tr.family(s) == fam)


def test_every_family_is_found(gpt) -> None:
    _m, syms, _d = gpt
    assert {tr.family(s) for s in syms} >= {"qk", "vo", "mlp", "ln"}


def test_qk_and_vo_charges_match_the_conv1d_columns(gpt) -> None:
    """Orientation: HF Conv1D stores (in, out); a head's Q/K charge is W_QᵀW_Q + b_Q b_Qᵀ − (K)."""
    model, syms, _d = gpt
    w = model.transformer.h[0].attn.c_attn.weight.detach()  # (D, 3D)
    b = model.transformer.h[0].attn.c_attn.bias.detach()
    wo = model.transformer.h[0].attn.c_proj.weight.detach()  # (D in, D out)
    jqk, jvo = _by_family(syms, "qk").charge(model), _by_family(syms, "vo").charge(model)
    for h in range(H):
        q, k, v = (slice(o + h * DH, o + (h + 1) * DH) for o in (0, D, 2 * D))
        ref_qk = (w[:, q].T @ w[:, q] + torch.outer(b[q], b[q])
                  - w[:, k].T @ w[:, k] - torch.outer(b[k], b[k]))
        rows = slice(h * DH, (h + 1) * DH)  # c_proj's input rows read head h's output
        ref_vo = w[:, v].T @ w[:, v] + torch.outer(b[v], b[v]) - wo[rows] @ wo[rows].T
        torch.testing.assert_close(jqk[h], ref_qk, rtol=0, atol=1e-14)
        torch.testing.assert_close(jvo[h], ref_vo, rtol=0, atol=1e-14)
    fc, fcb = model.transformer.h[0].mlp.c_fc.weight.detach(), model.transformer.h[0].mlp.c_fc.bias
    pr = model.transformer.h[0].mlp.c_proj.weight.detach()
    ref = fc.square().sum(0) + fcb.detach().square() - pr.square().sum(1)
    torch.testing.assert_close(_by_family(syms, "mlp").charge(model), ref, rtol=0, atol=1e-14)


def _rec(gpt, spec: tr.RunSpec, dtype: torch.dtype = torch.float64, **kw) -> tr.Recorded:
    import copy

    model, syms, data = gpt
    m = copy.deepcopy(model).to(dtype)
    return tr.train_recorded(m, syms, data, spec, 8, 16, torch.Generator().manual_seed(3),
                             lambda *a, **k: None, lambda n: None, 100, **kw)


def _ratios(rec: tr.Recorded) -> list[float]:
    return [float(t.ident) for t in rec.traces]


def test_identity_holds_to_round_off_and_the_bound_is_sharp_enough(gpt) -> None:
    lr, wd = 0.3, 0.05
    assert max(_ratios(_rec(gpt, tr.RunSpec("sgd", lr, wd, 15)))) <= 1.0
    # the check can fail: a wrong weight decay in the prediction, or float32 arithmetic
    assert min(_ratios(_rec(gpt, tr.RunSpec("sgd", lr, wd, 15), ident_wd=0.0))) > 1e3
    assert max(_ratios(_rec(gpt, tr.RunSpec("sgd", lr, wd, 15), torch.float32))) > 10.0


def test_adamw_breaks_the_identity(gpt) -> None:
    """AdamW is only measured: its update has no exact charge identity (checked, not assumed)."""
    assert max(_ratios(_rec(gpt, tr.RunSpec("adamw", 1e-3, 0.1, 10)))) > 1e3


def test_adamw_metric_matches_adam_written_by_hand() -> None:
    """√(√v̂ + ε) from torch's AdamW state against Adam's recurrences written out (float64)."""
    from neurothermo.experiments._gpt_balance_precon import adamw_metric

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.1)
    with pytest.raises(ValueError, match="first step"):
        adamw_metric(opt)
    v = torch.zeros_like(p)
    theta = p.detach().clone()
    for t in range(1, 6):
        grad = torch.randn(5, 3, generator=g, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        v = 0.999 * v + 0.001 * grad**2
        denom = (v / (1 - 0.999**t)).sqrt() + 1e-8
        theta = theta * (1 - 1e-2 * 0.1) - 1e-2 * grad / denom  # β1 = 0: m̂ = g
        torch.testing.assert_close(adamw_metric(opt)[p], denom.sqrt(), rtol=1e-14, atol=0)
        torch.testing.assert_close(p.detach(), theta, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="AdamW"):
        adamw_metric(torch.optim.SGD([p], lr=0.1))


def test_preconditioned_identity_holds_without_momentum_only(gpt) -> None:
    """In Adam's metric the rescale charges obey J_Λ' = q²J_Λ + η²gᵀAΛg at β1 = 0 (to round-off);
    with momentum (β1 = 0.9) θᵀA·m̂ ≠ 0 breaks it, and float32 arithmetic exceeds the bound."""
    def worst(b1: float, dtype: torch.dtype = torch.float64) -> list[float]:
        rec = _rec(gpt, tr.RunSpec("adamw", 1e-3, 0.1, 12, beta1=b1), dtype)
        assert {p.fam for p in rec.precon} == {"mlp", "ln"}
        return [float(p.ratio) for p in rec.precon]

    assert max(worst(0.0)) <= 1.0
    assert min(worst(0.9)) > 1e3
    assert min(worst(0.0, torch.float32)) > 10.0
    # SGD runs have no preconditioned record; rotations get none (their generator is not diagonal)
    assert _rec(gpt, tr.RunSpec("sgd", 0.3, 0.05, 3)).precon == []


def test_streamed_law_equals_the_law_on_stored_series(gpt) -> None:
    """Reference: a plain SGD loop on the same batches storing J_t and gᵀAg_t every step; the law
    from the stored series (numpy) equals the streamed block sums, and the record does not grow
    with the steps (≤ n_samples + 1 sampled points plus the window ends)."""
    import copy

    model, syms, data = gpt
    lr, wd, steps = 0.3, 0.05, 40
    win = tr.Window(12, steps, 4)
    rec = _rec(gpt, tr.RunSpec("sgd", lr, wd, steps), windows={"law": win}, n_samples=5)
    m = copy.deepcopy(model)
    named = dict(m.named_parameters())
    opt = torch.optim.SGD(m.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(3)
    charged = [s for s in syms if tr.family(s) is not None]
    js: list[list[torch.Tensor]] = [[s.charge(named).detach()] for s in charged]
    gs: list[list[torch.Tensor]] = [[] for _ in charged]
    for _ in range(steps):
        loss = lm.next_char_loss(tr.Logits(m), lm.windows(data.train, 8, 17, g))
        opt.zero_grad()
        loss.backward()
        for i, s in enumerate(charged):
            gs[i].append(s.imbalance({n: p.grad for n, p in named.items()}).detach())
        opt.step()
        for i, s in enumerate(charged):
            js[i].append(s.charge(named).detach())
    assert len(rec.traces) == len(charged)
    for i, t in enumerate(rec.traces):
        j = torch.stack([tr.unit_scalar(x) for x in js[i]]).numpy()
        gag = torch.stack([tr.unit_scalar(x) for x in gs[i]]).numpy()
        ref = ck.wd_law(j, gag, lr, wd, win.start, win.n_blocks)
        s = t.sums["law"].numpy()
        got = ck.law_from_blocks(s["blocks"], np.asarray(win.sizes(), float), s["gag"], s["cn"],
                                 s["n_start"], s["n_end"], lr)
        np.testing.assert_allclose(got.resid, ref.resid, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(got.se, ref.se, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(got.resid, got.drift, rtol=1e-6, atol=1e-12)  # exact identity
        assert len(t.series) <= 5 + 1 + 2


def test_wd_law_on_a_synthetic_charge() -> None:
    """N' = (1−ηwd)²N + η²x with x iid: the law holds after 5τ; a ramping x (non-stationary) fails."""
    lr, wd, n = 0.5, 0.1, 4000
    rng = np.random.default_rng(0)
    d = (1 - lr * wd) ** 2

    def charge(x: np.ndarray, j0: float) -> np.ndarray:
        j = np.empty(n + 1)
        j[0] = j0
        for t in range(n):
            j[t + 1] = d * j[t] + lr**2 * x[t]
        return j

    x = rng.normal(1.0, 1.0, n)
    tau = 1 / (lr * wd * (2 - lr * wd))
    start = int(5 * tau)
    law = ck.wd_law(charge(x, 50.0)[:, None], x[:, None], lr, wd, start, 10)
    lim = ck.z_limit(10, 1, 0.01)
    assert abs(law.z[0]) < lim
    np.testing.assert_allclose(law.resid, law.drift, rtol=1e-9)  # the exact windowed identity
    ramp = x + np.linspace(0, 40, n)
    assert abs(ck.wd_law(charge(ramp, 50.0)[:, None], ramp[:, None], lr, wd, start, 10).z[0]) > lim


def test_relative_residual_is_the_drift_of_n_over_its_mean_times_tau_over_n() -> None:
    """``GroupLaw.rel`` = |ΔN|/|⟨N⟩|·τ/n by the identity (a naive reimplementation), small for a
    relaxed charge and ≫ 1 for one that has not relaxed (the window shorter than τ)."""
    from neurothermo.experiments._gpt_balance_laws import GroupLaw

    lr, wd = 0.5, 0.1
    d = (1 - lr * wd) ** 2
    tau = 1 / (lr * wd * (2 - lr * wd))
    rng = np.random.default_rng(1)

    def rel(x: np.ndarray, start: int) -> tuple[float, float]:
        n = x.shape[0]
        j = np.zeros(n + 1)
        for t in range(n):
            j[t + 1] = d * j[t] + lr**2 * x[t]
        law = ck.wd_law(j[:, None], x[:, None], lr, wd, start, 10 if n >= 100 else 2)
        nw = j[start:-1]  # N over the window (J_0 = 0, so N = J)
        naive = abs(j[-1] - j[start]) / abs(nw.mean()) * tau / (n - start)
        return GroupLaw("g", law, 0.0).rel, naive

    relaxed, naive = rel(rng.normal(1.0, 1.0, 4000), int(5 * tau))
    assert relaxed == pytest.approx(naive, rel=1e-9)
    # relaxed: |ΔN| is of the order of N's stationary spread (≈ 0.2·|⟨N⟩| here), times τ/n ≈ 1/360
    assert relaxed < 0.01
    # not relaxed: a constant drive from N = 0 over n = 5 steps ≪ τ ≈ 10.5. Closed form:
    # N_t = (x/c)(1 − q^t), so ⟨x − cN⟩ = x·m and c⟨N⟩ = x(1 − m), m = (1 − qⁿ)/(n(1 − q))
    n = 5
    fresh, naive = rel(np.ones(n), 0)
    m = (1 - d**n) / (n * (1 - d))
    assert fresh == pytest.approx(naive, rel=1e-9)
    assert fresh == pytest.approx(m / (1 - m), rel=1e-9)
    assert fresh > 1.0


# one block of the quick preset's model, for the controls (at width 16 every group shrinks at
# 0.6–0.8 of the weight-decay rate, κ ≥ 0.6, and the law has no group to be checked on)
TINY = ("d_model=32", "n_layers=1", "n_heads=2", "seq_len=32", "batch_size=16", "steps=640",
        "log_every=160", "lr=0.3", "weight_decay=0.02", "attn_init_std=0", "qk_premise=false",
        "control_steps=0", "window_start=5")  # (the quick preset's η, wd, init, window)


def _preds(res) -> dict[str, dict]:
    return {p["name"]: p for p in res.summary["predictions"]}


def test_moved_fraction_against_a_hand_computation() -> None:
    """M = Σ‖J_T − q^T J_0‖ / Σ‖q^T J_0‖ per family: Frobenius per head, |·| per unit."""
    from types import SimpleNamespace

    from neurothermo.experiments._gpt_balance_laws import RunResult, moved_fraction

    lr, wd, steps = 0.5, 0.01, 30
    q = (1 - lr * wd) ** (2 * steps)
    j0_head = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    n_head = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    j0_unit = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    n_unit = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    traces = [SimpleNamespace(fam="vo", j0=j0_head, j=q * j0_head + n_head),
              SimpleNamespace(fam="mlp", j0=j0_unit, j=q * j0_unit + n_unit),
              SimpleNamespace(fam="ln", j0=j0_unit, j=q * j0_unit)]
    res = RunResult(tr.RunSpec("sgd", lr, wd, steps), traces, 0.0, {})  # type: ignore[arg-type]
    m = moved_fraction(res)
    # per head: ‖N‖_F = √2 and 2, ‖q J_0‖_F = 5q and q
    assert m["vo"] == pytest.approx((2**0.5 + 2.0) / (6.0 * q), rel=1e-12)
    assert m["mlp"] == pytest.approx(0.6 / (3.5 * q), rel=1e-12)
    assert m["ln"] == pytest.approx(0.0, abs=1e-12)


def test_decay_exponent_separates_stationary_from_untrained_weights() -> None:
    lr, wd, n = 0.3, 0.02, 200
    pure = (1 - lr * wd) ** (2 * n)
    k = ck.decay_exponent(np.array([2.0, 2.0, 2.0]), np.array([2.0 * pure, 2.0, 2.0 / pure]),
                          lr, wd, n)
    np.testing.assert_allclose(k, [1.0, 0.0, -1.0], atol=1e-12)


def test_main_run_identities_and_controls(tmp_path: Path) -> None:
    # the quick preset itself: in the one-block model the MLP is still growing through the window
    # under pytest's corpus (κ = −0.08, gross +25 %) and fails the law (z = 4.0): the premise
    # detects untrained groups, not groups still learning (docs/experiments/gpt-balance.md)
    res = run_experiment("gpt-balance", out=tmp_path, quick=True)
    preds = _preds(res)
    failed = [(n, p["measured"]) for n, p in preds.items() if not p["passed"]]
    assert not failed, failed
    sgd = res.summary["figures"]["sgd"]
    # the law is checked on every family the loss trains here, per family and per group
    for fam in ("V/O", "MLP", "LayerNorm"):
        assert any(fam in n and "(sum over" in n for n in preds), fam
    # the premise's measured reason: W_Q, W_K are not trained at this size (each gets a gradient
    # only through the other while the logits do not matter), so they shrink at the weight-decay
    # rate: κ ≈ 1 for every Q/K head (and the law is not predicted for them)
    qk = [v for k, v in sgd["groups"].items() if k.startswith("qk")]
    assert qk and all(abs(v["kappa"] - 1.0) < 0.05 and not v["premise"] for v in qk)
    # the recorded relative residual is |resid| / |c⟨N⟩| of the same law
    for fam in ("vo", "mlp", "ln"):
        law = sgd[f"law_{fam}"]
        assert law["rel"] == pytest.approx(abs(law["resid"]) / abs(law["cJ"]), rel=1e-12)
    assert all(v["rel"] >= 0 for v in sgd["groups"].values())
    assert set(res.summary["figures"]["small_lr"]["small_lr"]["rel"]) == {"qk", "vo", "mlp", "ln"}
    # "charges kept" holds at η/100 (a prediction above) and fails at the full η, where the noise
    # replaces the start in the families SGD trains (V/O, MLP; measured 390 and 12 at seed 0):
    # without the cause (a small η) the check fails, so it is not implied by the identity
    assert sum("AdamW, β1 = 0" in n for n in preds) == 2  # MLP and LayerNorm rescales
    moved = res.summary["figures"]["sgd"]["moved"]
    assert moved["vo"] > KEPT_MAX and moved["mlp"] > KEPT_MAX, moved
    assert max(res.summary["figures"]["small_lr"]["small_lr"]["moved"].values()) <= KEPT_MAX
    assert {"imbalance.png", "energies.png"} <= {f.name for f in res.path.iterdir()}


def test_small_lr_control_fails_the_main_law(tmp_path: Path) -> None:
    res = run_experiment("gpt-balance", out=tmp_path, overrides=(*TINY, "variant=small-lr"))
    preds = _preds(res)
    # the families with the largest initial imbalance: at η/100 nothing is trained, so either the
    # law's premise (stationary weights) fails or, where it is met, the law itself fails
    for fam in ("MLP", "LayerNorm"):
        law = [p for n, p in preds.items() if "weight-decay law" in n and fam in n]
        assert law and not all(p["passed"] for p in law), fam
    assert all(p["passed"] for n, p in preds.items() if "identity" in n)  # still exact


def test_broken_control_fails_the_qk_identity_and_law(tmp_path: Path) -> None:
    res = run_experiment("gpt-balance", out=tmp_path, overrides=(*TINY, "variant=broken"))
    preds = _preds(res)
    qk = [p for n, p in preds.items() if "Q/K" in n and ("(sum" in n or "identity" in n)]
    assert len(qk) == 2 and not any(p["passed"] for p in qk)
    for n, p in preds.items():
        if "identity" in n and ("V/O" in n or "MLP" in n):
            assert p["passed"], n


def test_attn_init_std_redraws_only_the_attention_weights() -> None:
    # the full preset's fan-in init: every c_attn / attention c_proj weight ~ N(0, s²), the rest as
    # GPT-2 draws it (0.02); 0 keeps GPT-2's init bit for bit (the quick preset's model)
    d, s = 64, 64 ** -0.5
    ref = dict(tr.build_gpt(20, d, 2, 4, 16, 0, torch.float64).named_parameters())
    new = dict(tr.build_gpt(20, d, 2, 4, 16, 0, torch.float64, attn_init_std=s).named_parameters())
    same = dict(tr.build_gpt(20, d, 2, 4, 16, 0, torch.float64, attn_init_std=0.0).named_parameters())
    assert all(torch.equal(ref[n], same[n]) for n in ref)
    for n, p in new.items():
        if n.endswith(("attn.c_attn.weight", "attn.c_proj.weight")):
            # sample std of ≥ 4096 normals: relative SE 1/√(2·4096) ≈ 0.011, 5 SE
            assert abs(float(p.detach().std()) / s - 1) < 5 / (2 * p.numel()) ** 0.5, n
        else:
            assert torch.equal(p, ref[n]), n


def test_control_steps_must_leave_a_law_window() -> None:
    from neurothermo.experiments.gpt_balance import GptBalanceConfig

    # τ = 1/(0.5·0.004·1.998) ≈ 250 steps: the window starts at 5τ = 1251
    GptBalanceConfig(lr=0.5, weight_decay=0.004, steps=3000, control_steps=1300).check()
    with pytest.raises(ValueError, match="control_steps=1260"):
        GptBalanceConfig(lr=0.5, weight_decay=0.004, steps=3000, control_steps=1260).check()
