from __future__ import annotations

import math

import pytest
import torch

from neurothermo.alignment.grouped import GroupedAlignment
from neurothermo.config import ConfigError
from neurothermo.experiments import _char_lm as lm
from neurothermo.experiments import transformer_alignment as ta
from neurothermo.experiments.base import RunContext
from neurothermo.models.transformer import TinyTransformer
from neurothermo.runner import ExperimentFailed, run_experiment

TINY = ["d_model_a=32", "d_model_b=32", "n_layers_a=2", "n_layers_b=2", "seq_len=16",
        "warmup=10", "eval_sequences=32", "log_every=25"]


@pytest.fixture(scope="module")
def data() -> lm.CharData:
    return lm.CharData.from_docs(lm.docstring_corpus())


def test_corpus_split_and_encoding(data: lm.CharData) -> None:
    docs = lm.docstring_corpus()
    assert docs == lm.docstring_corpus()  # deterministic order
    assert len(docs) > 500 and all(len(d) >= 40 for d in docs) and len(set(docs)) == len(docs)
    decode = "".join
    test = decode(data.vocab[i] for i in data.test.tolist())
    assert test == "\n\n".join(docs[9::10])  # every tenth document is held out
    train = decode(data.vocab[i] for i in data.train.tolist())
    assert train.startswith(docs[0]) and docs[9] not in train.split("\n\n")[:9]
    assert set(data.vocab) <= {chr(c) for c in range(32, 127)} | {"\n"}
    assert list(data.vocab) == sorted(data.vocab)
    with pytest.raises(ValueError, match="need at least 10 documents"):
        lm.CharData.from_docs(["only one document here"])


def test_windows_are_contiguous_slices() -> None:
    ids = torch.arange(100) * 3
    w = lm.windows(ids, 7, 9, torch.Generator().manual_seed(0))
    assert w.shape == (7, 9)
    assert bool((w.diff(dim=1) == 3).all()) and bool((w[:, 0] % 3 == 0).all())
    with pytest.raises(ValueError, match="shorter than a window"):
        lm.windows(ids[:5], 2, 6, torch.Generator())


def test_unigram_entropy_closed_forms() -> None:
    assert lm.unigram_entropy(torch.arange(8).repeat(5), 10) == pytest.approx(math.log(8), rel=1e-12)
    ids = torch.tensor([0, 0, 0, 1])  # p = (3/4, 1/4)
    assert lm.unigram_entropy(ids, 3) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


@torch.no_grad()
def test_next_char_loss_matches_a_per_position_loop() -> None:
    m = TinyTransformer(7, 8, 1, 2, max_len=6, generator=torch.Generator().manual_seed(0)).double()
    seqs = torch.randint(7, (3, 6), generator=torch.Generator().manual_seed(1))
    ref = 0.0
    for i in range(3):
        for t in range(5):  # position t predicts seqs[i, t+1] from seqs[i, :t+1] alone (causal)
            logp = torch.log_softmax(m(seqs[i : i + 1, : t + 1])[0, -1], dim=-1)
            ref -= float(logp[seqs[i, t + 1]])
    assert float(lm.next_char_loss(m, seqs)) == pytest.approx(ref / 15, rel=1e-12)


def test_learning_rate_schedule() -> None:
    cfg = ta.TransformerAlignmentConfig(lr=1.0, warmup=10, steps=110)
    assert lm.lr_at(0, cfg) == pytest.approx(0.1)
    assert lm.lr_at(9, cfg) == pytest.approx(1.0)
    assert lm.lr_at(10, cfg) == pytest.approx(1.0)
    assert lm.lr_at(60, cfg) == pytest.approx(0.5)  # half-way through the cosine
    assert lm.lr_at(109, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))


def test_block_features_per_token_and_per_window() -> None:
    m = TinyTransformer(9, 8, 2, 2, max_len=5, generator=torch.Generator().manual_seed(2))
    seqs = torch.randint(9, (4, 5), generator=torch.Generator().manual_seed(3))
    captured: dict[str, torch.Tensor] = {}
    handle = m.blocks[1].mlp.register_forward_hook(lambda _m, _i, out: captured.update(out=out))
    with torch.no_grad():
        m(seqs)
    handle.remove()
    out = captured["out"]  # (4, 5, 8)
    tok = ta.block_features(m, seqs, "token")
    assert list(tok) == ["attn 0", "mlp 0", "attn 1", "mlp 1"]  # depth order
    assert tok["attn 0"].shape == (20, 8)
    torch.testing.assert_close(tok["mlp 1"][2 * 5 + 3], out[2, 3])  # row i·T + t is token t of window i
    torch.testing.assert_close(ta.block_features(m, seqs, "mean")["mlp 1"], out.mean(dim=1))
    torch.testing.assert_close(ta.block_features(m, seqs, "last")["mlp 1"], out[:, -1])
    assert ta.sample_groups(5, 3, 2, "token").tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert ta.sample_groups(5, 3, 2, "mean").tolist() == [0, 1, 0, 1, 0]


NAMES = ("attn 0", "mlp 0", "attn 1", "mlp 1")


def _grouped(mlp: float, attn: float, first: float, spread: float = 0.02,
             mixed: float = 0.1) -> GroupedAlignment:
    """A cross map over NAMES on 6 groups: MLP×MLP cells ``mlp``, attention cells ``attn`` except
    (attn 0, attn 0) = ``first``, mixed cells ``mixed``; group s shifts every cell by spread·(s − 2.5)."""
    base = torch.full((4, 4), mixed, dtype=torch.float64)
    for i in (1, 3):
        for j in (1, 3):
            base[i, j] = mlp
    for i in (0, 2):
        for j in (0, 2):
            base[i, j] = attn
    base[0, 0] = first
    shift = spread * (torch.arange(6, dtype=torch.float64) - 2.5)
    return GroupedAlignment(base + shift[:, None, None], NAMES, NAMES, "m", True, (10,) * 6)


def test_block_means_pick_the_right_cells() -> None:
    g = _grouped(0.7, 0.05, 0.6, spread=0.0)
    means = ta.block_means(g)
    assert means["mlp"].tolist() == pytest.approx([0.7] * 6)
    assert means["attn"].tolist() == pytest.approx([(0.6 + 3 * 0.05) / 4] * 6)
    assert means["first_minus_deep"].tolist() == pytest.approx([0.6 - 0.05] * 6)


def _predictions(trained: GroupedAlignment, init: GroupedAlignment, tmp_path, **cfg) -> dict[str, bool]:
    from neurothermo.runstore import Run

    ctx = RunContext(run=Run.create(tmp_path, "t"), seed=0, quick=True)
    ta.predict_alignment(ctx, ta.TransformerAlignmentConfig(**cfg),
                         dict.fromkeys(ta.METRIC_NAMES, trained), dict.fromkeys(ta.METRIC_NAMES, init))
    return {p.name: p.passed for p in ctx.predictions}


def test_predictions_follow_the_paper_pattern_and_can_fail(tmp_path) -> None:
    init = _grouped(0.3, 0.45, 0.5)
    paper = _predictions(_grouped(0.75, 0.1, 0.6), init, tmp_path)
    assert len(paper) == 8 and all(paper.values())  # 3 gaps, 3 gap gains, 2 first-layer
    # the same networks before training: nothing gained, attention ahead: every prediction fails
    assert not any(_predictions(init, init, tmp_path).values())
    # attention further ahead after training than before, first layer not singled out: all fail,
    # although the MLP blocks gained 0.2 (the MLP gain alone is not a prediction)
    assert not any(_predictions(_grouped(0.5, 0.8, 0.5), init, tmp_path).values())
    # MLP ahead by less than the margin (0.08 < 0.1): the level claim fails, the gain holds
    close = _predictions(_grouped(0.6, 0.52, 0.52), init, tmp_path, gap_metrics=("cka",))
    assert len(close) == 4
    assert not close["linear CKA: trained MLP blocks more aligned than attention blocks by > 0.1"]
    assert close["linear CKA: learning opens the MLP − attention gap (trained gap − initial gap > 0)"]
    # the paper pattern again, but the (attn 0, attn 0) cell scatters over groups by 1.5·(s − 2.5)
    # (se ≈ 1.15): the first-layer excess 0.5 (gain 0.45) is inside the spread, and so is the gap gain
    # 0.69 (the cell enters the attention mean with weight 1/4: se ≈ 0.29, t* = 3.36 at 5 dof)
    wide = _grouped(0.75, 0.1, 0.6, spread=0.0)
    wide.per_group[:, 0, 0] += 1.5 * (torch.arange(6, dtype=torch.float64) - 2.5)
    noisy = _predictions(wide, init, tmp_path)
    assert not noisy["Gram Pearson: learning singles out the first attention layer (gain of attn 0 − deeper > 0)"]
    assert not noisy["Gram Pearson: learning opens the MLP − attention gap (trained gap − initial gap > 0)"]
    assert not noisy["linear CKA: trained MLP blocks more aligned than attention blocks by > 0.1"]


def test_quick_run_small_and_its_untrained_control(tmp_path) -> None:
    res = run_experiment("transformer-alignment", quick=True, out=tmp_path, overrides=[*TINY, "steps=150"])
    s = res.summary
    preds = {p["name"]: p for p in s["predictions"]}
    assert len(preds) == 10
    # 150 Adam steps already beat the unigram predictor (held-out ≈ 2.8 vs 3.26 nats)
    assert preds["net A: held-out loss below the unigram entropy (learned context)"]["passed"]
    assert preds["net B: held-out loss below the unigram entropy (learned context)"]["passed"]
    fig = s["figures"]
    assert fig["samples_per_group"] == 4 * 16 and fig["n_groups"] == 8  # 32 windows of 16 tokens
    cross = fig["alignment"]["trained"]["cross"]["gram_alignment"]
    assert cross["rows"] == list(NAMES) and cross["n_groups"] == 8
    within = fig["alignment"]["init"]["within"]["cka"]["matrix"]
    assert all(v == pytest.approx(1.0) for v in torch.tensor(within).diagonal().tolist())
    assert set(fig["summary_by_metric"]) >= {"mutual_knn", "cka", "gram_alignment"}
    assert sorted(s["files"]) == ["alignment_vs_steps.png", "block_summary.png", "training.png",
                                  "transformer_alignment.png"]
    # the alignment-vs-steps curve: step 0 is the initial map and the last step the trained one
    curve = fig["alignment_vs_steps"]
    assert curve["steps"] == [0, 25, 50, 100, 150]  # default checkpoints below steps=150, and the end
    for metric in ("mutual_knn", "cka", "gram_alignment"):
        rec = fig["summary_by_metric"][metric]
        for kind in ("mlp", "attn"):
            assert curve[metric][kind][0] == pytest.approx(rec[f"{kind}_init"], rel=1e-12)
            assert curve[metric][kind][-1] == pytest.approx(rec[f"{kind}_trained"], rel=1e-12)
    assert curve["held_out_loss"]["A"][-1] == pytest.approx(fig["held_out_loss"]["A"], rel=1e-12)
    assert (res.path / "transformer_alignment.png").stat().st_size > 10_000
    # control: the untrained networks must fail every prediction
    res = run_experiment("transformer-alignment", quick=True, out=tmp_path, overrides=[*TINY, "steps=0"])
    failed = [p["name"] for p in res.summary["predictions"] if not p["passed"]]
    assert len(failed) == 10, [p["name"] for p in res.summary["predictions"] if p["passed"]]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (["n_heads=5"], "n_heads=5 does not divide d_model_a=48"),
        (["k=50", "pool=mean"], "k=50 must be below the samples per group"),
        (["groups=30"], "fewer than two windows per group"),
        (["warmup=600"], "warmup=600 must be below steps=600"),
        (["gap_metrics=cka,svcca"], "gap_metrics=cka,svcca: choose one or more of"),
        (["pool=cls"], "expected one of"),
        (["activation=tanh"], "expected one of"),
        (["lr=0"], "must be >= 1e-07"),
    ],
)
def test_bad_settings_are_refused(override, match) -> None:
    with pytest.raises(ConfigError, match=match):
        run_experiment("transformer-alignment", quick=True, overrides=override)


def test_divergence_is_an_error_not_nan(tmp_path) -> None:
    with pytest.raises(ExperimentFailed, match=r"training loss became (nan|inf|-inf) at step \d+; lower lr"):
        run_experiment("transformer-alignment", quick=True, out=tmp_path,
                       overrides=["d_model_a=16", "d_model_b=16", "n_layers_a=1", "n_layers_b=1",
                                  "seq_len=8", "steps=30", "warmup=0", "eval_sequences=16",
                                  "log_every=5", "optimizer=sgd", "lr=10"])
