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
    gross: list[list[torch.Tensor]] = [[] for _ in charged]
    for _ in range(steps):
        loss = lm.next_char_loss(tr.Logits(m), lm.windows(data.train, 8, 17, g))
        opt.zero_grad()
        loss.backward()
        for i, s in enumerate(charged):
            gross[i].append((ck.role_energy(s, named, "in") + ck.role_energy(s, named, "out"))
                            .detach().double())
        for i, s in enumerate(charged):
            gs[i].append(s.imbalance({n: p.grad for n, p in named.items()}).detach())
        opt.step()
        for i, s in enumerate(charged):
            js[i].append(s.charge(named).detach())
    assert len(rec.traces) == len(charged)
    z_half_ref: list[np.ndarray] = []
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
        gb = np.stack([b.sum(0) for b in np.array_split(torch.stack(gross[i]).numpy()[win.start:],
                                                        win.n_blocks, axis=0)])
        np.testing.assert_allclose(s["gross_blocks"], gb, rtol=1e-12)
        n_ser = j - (1 - lr * wd) ** (2 * np.arange(j.shape[0]))[:, None] * j[:1]
        nb = np.stack([b.sum(0) for b in np.array_split(n_ser[win.start:-1], win.n_blocks, axis=0)])
        np.testing.assert_allclose(s["n_blocks"], nb, rtol=1e-9, atol=1e-15)
        # the law with c/2 from the streamed sums against the stored series
        c = ck.law_constant(lr, wd)
        x = gag[win.start:] - 0.5 * c * n_ser[win.start:-1]
        means = np.stack([b.mean(0) for b in np.array_split(x, win.n_blocks, axis=0)])
        se_ref = means.std(0, ddof=1) / np.sqrt(win.n_blocks)
        z_ref = x.mean(0) / se_ref
        half = ck.law_from_blocks(s["blocks"] + 0.5 * c * s["n_blocks"],
                                  np.asarray(win.sizes(), float), s["gag"], 0.5 * s["cn"],
                                  s["n_start"], s["n_end"], lr)
        # mean and SE to round-off of the scale (a unit whose x barely moves has an SE at
        # round-off, and its z is then round-off over round-off)
        scale = np.abs(x).max()
        np.testing.assert_allclose(half.resid, x.mean(0), rtol=1e-6, atol=1e-10 * scale)
        np.testing.assert_allclose(half.se, se_ref, rtol=1e-6, atol=1e-10 * scale)
        z_half_ref.append(np.abs(half.z) if t.fam not in ("qk", "vo") else np.abs(z_ref))
        assert len(t.series) <= 5 + 1 + 2
    # the same through laws(): per group (a head, or a layer's units summed) z_half
    from neurothermo.experiments._gpt_balance_laws import RunResult, laws

    per_group = laws(RunResult(tr.RunSpec("sgd", lr, wd, steps), rec.traces, 0.0, {"law": win}))
    head_rows = [r for f, rows in per_group.items() if f in ("qk", "vo") for r in rows[1:]]
    ref_heads = [z for t, zs in zip(rec.traces, z_half_ref) if t.fam in ("qk", "vo") for z in zs]
    np.testing.assert_allclose([r.z_half for r in head_rows], ref_heads, rtol=1e-7)


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
        "control_steps=0", "window_start=5", "mlp_init_std=0", "pin_constant=false",
        "adamw_steps=0")  # (the quick preset's η, wd, init, window)


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


def test_trend_against_scipy_linregress_and_on_stationary_and_growing_series() -> None:
    """``trend``: the slope's t-statistic of the block means against scipy's regression (an
    independent fit), the growth as the fitted change over the window in units of its mean; an
    AR(1) series with correlation time 5 in blocks of 200 steps is stationary (|z| below the t
    limit at level 0.01, 8 dof), the same series on a ramp to 3× is not."""
    from scipy.stats import linregress

    rng = np.random.default_rng(4)
    n, nb = 2000, 10
    sizes = ck.block_sizes(n, nb)
    x = np.empty(n)
    x[0] = 0.0
    for t in range(1, n):  # AR(1), ρ = 0.8: correlation time 5 steps ≪ the 200-step blocks
        x[t] = 0.8 * x[t - 1] + rng.normal()
    series = np.stack([10.0 + x, 10.0 + x + np.linspace(0.0, 20.0, n)], axis=1)
    sums = np.stack([b.sum(0) for b in np.array_split(series, nb, axis=0)])
    z, growth = ck.trend(sums, sizes)
    mid = np.cumsum(sizes) - sizes / 2
    for k in range(2):
        ref = linregress(mid, sums[:, k] / sizes)
        assert z[k] == pytest.approx(ref.slope / ref.stderr, rel=1e-9)
        assert growth[k] == pytest.approx(ref.slope * n / (sums[:, k] / sizes).mean(), rel=1e-9)
    lim = ck.z_limit(nb, 1, 0.01, dof=nb - 2)
    assert abs(z[0]) < lim
    # the AR(1)'s long-run sd is 1/(1 − ρ) = 5, so a block mean scatters by 5/√200 ≈ 0.35 and
    # the fitted change over n steps by 0.35·n/√Σ(s_b − s̄)² ≈ 0.39, a growth SE of 0.039: 4 SE
    assert abs(growth[0]) < 4 * 0.039
    assert z[1] > lim and growth[1] == pytest.approx(1.0, rel=0.05)  # 10 → 30 about a mean of 20


def test_the_law_check_rejects_half_its_constant_over_a_long_window_only() -> None:
    """What ``z_half`` records: on the synthetic stationary charge (N' = q²N + η²x, x iid) the
    law holds at c. Over a long window (395τ) the same data reject c/2 (|z| far above the
    limit): there a passing check tests the constant. Over 2τ in 10 blocks c/2 passes too, so a
    passing check says nothing about the constant (as in the quick preset)."""
    from neurothermo.experiments._gpt_balance_laws import GroupLaw

    lr, wd = 0.5, 0.1
    d = (1 - lr * wd) ** 2
    tau = 1 / (lr * wd * (2 - lr * wd))
    c = ck.law_constant(lr, wd)
    lim = ck.z_limit(10, 1, 0.01)

    def run(n: int, start: int, seed: int) -> tuple[GroupLaw, float]:
        rng = np.random.default_rng(seed)
        x = rng.normal(1.0, 3.0, n)
        j = np.zeros(n + 1)
        j[0] = 1.0 / c  # the stationary mean of N, so the window needs no burn-in
        for t in range(n):
            j[t + 1] = d * j[t] + lr**2 * x[t]
        law = ck.wd_law(j[:, None], x[:, None], lr, wd, start, 10)
        # N = J − q^{2t}J_0 is what the law uses; c/2 on the same N, by hand
        n_ser = j - d ** np.arange(n + 1) * j[0]
        xs = x[start:] - 0.5 * c * n_ser[start:-1]
        means = np.array([b.mean() for b in np.array_split(xs, 10)])
        z_half = abs(xs.mean()) / (means.std(ddof=1) / np.sqrt(10))
        return GroupLaw("g", law, 0.0), z_half

    long, z_half = run(int(400 * tau), int(5 * tau), 0)
    assert long.z < lim and z_half > 3 * lim  # measured: z 0.41, z_half 13.5 (limit 3.25)
    assert long.resolution > 3 * lim  # |c⟨N⟩|/2SE: 48.9
    short = [run(int(7 * tau), int(5 * tau), s) for s in range(20)]
    assert all(g.z < lim for g, _ in short)  # the law holds
    # and so does the halved law (measured: 20 of 20 seeds, z_half ≤ 2.4)
    assert sum(zh < lim for _, zh in short) >= 15


def test_the_premise_needs_a_trained_group_without_drift() -> None:
    """``GroupLaw.stationary``: κ < 1/2 (trained) and |gross trend z| within the limit; each
    condition alone is not enough."""
    from neurothermo.experiments._gpt_balance_laws import GroupLaw

    law = ck.wd_law(np.zeros((11, 1)), np.zeros((10, 1)), 0.1, 0.1, 0, 2)
    assert GroupLaw("g", law, kappa=0.1, gross_z=2.0).stationary(4.5)
    assert not GroupLaw("g", law, kappa=0.1, gross_z=-6.0).stationary(4.5)  # still shrinking
    assert not GroupLaw("g", law, kappa=0.1, gross_z=6.0).stationary(4.5)  # still growing
    assert not GroupLaw("g", law, kappa=0.9, gross_z=0.0).stationary(4.5)  # not trained


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
    # With pin_constant the law's control (the same check at c/2) is predicted too. The quick
    # window (2.7 τ, blocks of 22 steps ≪ τ) cannot tell c from c/2 (z_half ≤ 3.4, recorded in
    # the docs), so that control fails here: it is a check that can fail, and the full
    # preset's window of 86 τ is what makes it pass there (docs/experiments/gpt-balance.md)
    res = run_experiment("gpt-balance", out=tmp_path, quick=True, overrides=("pin_constant=true",))
    preds = _preds(res)
    sgd = res.summary["figures"]["sgd"]
    pins = {n: p for n, p in preds.items() if "rejects half its constant" in n}
    checked = [f for f in ("vo", "mlp", "ln", "qk") if "z" in sgd[f"law_{f}"]]
    assert len(pins) == len(checked) >= 1
    for fam in checked:
        label = {"vo": "V/O", "mlp": "MLP", "ln": "LayerNorm", "qk": "Q/K"}[fam]
        (pin,) = [p for n, p in pins.items() if label in n]
        assert pin["control"] and pin["measured"] == sgd[f"law_{fam}"]["z_half"]
        assert pin["predicted"] == sgd["z_limit_family"]
        assert pin["passed"] == (pin["measured"] >= pin["predicted"]), fam
    assert not all(p["passed"] for p in pins.values()), pins  # (measured: none passes here)
    failed = [(n, p["measured"]) for n, p in preds.items() if not p["passed"] and n not in pins]
    assert not failed, failed
    # SGD trains V/O, MLP and LayerNorm here (predicted); the law is predicted on the trained
    # groups whose gross has no trend across the window, and recorded for the drifting ones
    for fam in ("V/O", "MLP", "LayerNorm"):
        assert any(n.startswith(f"sgd: SGD trains {fam}") for n in preds), fam
    for fam in ("vo", "mlp", "ln"):
        law = sgd[f"law_{fam}"]
        label = {"vo": "V/O", "mlp": "MLP", "ln": "LayerNorm"}[fam]
        predicted = any("weight-decay law E[" in n and label in n for n in preds)
        stationary = [v for k, v in sgd["groups"].items() if k.startswith(fam) and v["premise"]]
        assert predicted == bool(stationary), fam
        for v in stationary:
            assert v["kappa"] < 0.5 and abs(v["gross_z"]) <= sgd["z_limit_drift"]
        if not predicted:
            assert law["premise"] == "no trained group with a stationary gross" and law["drifting"]
    assert any("weight-decay law E[" in n for n in preds)  # at least one family checked
    # the premise's measured reason: W_Q, W_K are not trained at this size (each gets a gradient
    # only through the other while the logits do not matter), so they shrink at the weight-decay
    # rate: κ ≈ 1 for every Q/K head (and the law is not predicted for them)
    qk = [v for k, v in sgd["groups"].items() if k.startswith("qk")]
    assert qk and all(abs(v["kappa"] - 1.0) < 0.05 and not v["premise"] for v in qk)
    # the recorded relative residual is |resid| / |c⟨N⟩| of the same law
    for fam in ("vo", "mlp", "ln"):
        law = sgd[f"law_{fam}"]
        if "rel" in law:
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
    # at η/100 nothing is trained: the main run's "SGD trains" predictions fail, so the law has
    # no group to be predicted on (the in-run control checks the law itself on every group)
    for fam in ("MLP", "LayerNorm"):
        trains = [p for n, p in preds.items() if n.startswith(f"sgd: SGD trains {fam}")]
        assert trains and not any(p["passed"] for p in trains), fam
    assert not any("weight-decay law E[" in n for n in preds)
    assert all(p["passed"] for n, p in preds.items() if "identity" in n)  # still exact


def test_broken_control_fails_the_qk_identity_and_law(tmp_path: Path) -> None:
    res = run_experiment("gpt-balance", out=tmp_path, overrides=(*TINY, "variant=broken"))
    preds = _preds(res)
    qk = [p for n, p in preds.items() if "Q/K" in n and "identity" in n]
    assert len(qk) == 1 and not qk[0]["passed"]
    # W_K undecayed: J_QK has no stationary state, and the premise sees it (the heads' gross
    # drifts, |trend z| ≈ 8.5 > 4.5); on those groups the law's z is ≈ 1800 (it fails anyway)
    law = res.summary["figures"]["sgd"]["law_qk"]
    if any("Q/K" in n and "(sum" in n for n in preds):
        assert not any(p["passed"] for n, p in preds.items() if "Q/K" in n and "(sum" in n)
    else:
        assert law["premise"] == "no trained group with a stationary gross"
        assert law["z_trained"] > res.summary["figures"]["sgd"]["z_limit_family"]
    for n, p in preds.items():
        if "identity" in n and ("V/O" in n or "MLP" in n):
            assert p["passed"], n


@pytest.mark.parametrize("which", ["attn", "mlp"])
def test_init_std_redraws_only_its_weights(which: str) -> None:
    # the full preset's fan-in init: every c_attn / attention c_proj weight (attn_init_std) or
    # every MLP c_fc / c_proj weight (mlp_init_std) ~ N(0, s²), the rest as GPT-2 draws it (0.02);
    # 0 keeps GPT-2's init bit for bit (the quick preset's model)
    d, s = 64, 64 ** -0.5
    key = f"{which}_init_std"
    ends = (("attn.c_attn.weight", "attn.c_proj.weight") if which == "attn"
            else ("mlp.c_fc.weight", "mlp.c_proj.weight"))
    ref = dict(tr.build_gpt(20, d, 2, 4, 16, 0, torch.float64).named_parameters())
    new = dict(tr.build_gpt(20, d, 2, 4, 16, 0, torch.float64, **{key: s}).named_parameters())
    same = dict(tr.build_gpt(20, d, 2, 4, 16, 0, torch.float64, **{key: 0.0}).named_parameters())
    assert all(torch.equal(ref[n], same[n]) for n in ref)
    redrawn = 0
    for n, p in new.items():
        if n.endswith(ends):
            # sample std of ≥ 4096 normals: relative SE 1/√(2·4096) ≈ 0.011, 5 SE
            assert abs(float(p.detach().std()) / s - 1) < 5 / (2 * p.numel()) ** 0.5, n
            redrawn += 1
        else:
            assert torch.equal(p, ref[n]), n
    assert redrawn == 4  # two layers, two weights each


def test_control_steps_must_leave_a_law_window() -> None:
    from neurothermo.experiments.gpt_balance import GptBalanceConfig

    # τ = 1/(0.5·0.004·1.998) ≈ 250 steps: the window starts at 5τ = 1251
    GptBalanceConfig(lr=0.5, weight_decay=0.004, steps=3000, control_steps=1300).check()
    with pytest.raises(ValueError, match="control_steps=1260"):
        GptBalanceConfig(lr=0.5, weight_decay=0.004, steps=3000, control_steps=1260).check()
