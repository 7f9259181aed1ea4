from __future__ import annotations

import math

import pytest
import torch

from neurothermo.alignment import AlignmentMatrix
from neurothermo.config import ConfigError
from neurothermo.experiments import transformer_alignment as ta
from neurothermo.experiments.base import RunContext
from neurothermo.models.transformer import TinyTransformer
from neurothermo.runner import ExperimentFailed, run_experiment

TINY = ["d_model_a=32", "d_model_b=32", "n_layers_a=2", "n_layers_b=2", "seq_len=16",
        "warmup=10", "eval_sequences=24", "n_null=5", "log_every=25"]


@pytest.fixture(scope="module")
def data() -> ta.CharData:
    return ta.CharData.from_docs(ta.docstring_corpus())


def test_corpus_split_and_encoding(data: ta.CharData) -> None:
    docs = ta.docstring_corpus()
    assert docs == ta.docstring_corpus()  # deterministic order
    assert len(docs) > 500 and all(len(d) >= 40 for d in docs) and len(set(docs)) == len(docs)
    decode = "".join
    test = decode(data.vocab[i] for i in data.test.tolist())
    assert test == "\n\n".join(docs[9::10])  # every tenth document is held out
    train = decode(data.vocab[i] for i in data.train.tolist())
    assert train.startswith(docs[0]) and docs[9] not in train.split("\n\n")[:9]
    assert set(data.vocab) <= {chr(c) for c in range(32, 127)} | {"\n"}
    assert list(data.vocab) == sorted(data.vocab)
    with pytest.raises(ValueError, match="need at least 10 documents"):
        ta.CharData.from_docs(["only one document here"])


def test_windows_are_contiguous_slices() -> None:
    ids = torch.arange(100) * 3
    w = ta.windows(ids, 7, 9, torch.Generator().manual_seed(0))
    assert w.shape == (7, 9)
    assert bool((w.diff(dim=1) == 3).all()) and bool((w[:, 0] % 3 == 0).all())
    with pytest.raises(ValueError, match="shorter than a window"):
        ta.windows(ids[:5], 2, 6, torch.Generator())


def test_unigram_entropy_closed_forms() -> None:
    assert ta.unigram_entropy(torch.arange(8).repeat(5), 10) == pytest.approx(math.log(8), rel=1e-12)
    ids = torch.tensor([0, 0, 0, 1])  # p = (3/4, 1/4)
    assert ta.unigram_entropy(ids, 3) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


@torch.no_grad()
def test_next_char_loss_matches_a_per_position_loop() -> None:
    m = TinyTransformer(7, 8, 1, 2, max_len=6, generator=torch.Generator().manual_seed(0)).double()
    seqs = torch.randint(7, (3, 6), generator=torch.Generator().manual_seed(1))
    ref = 0.0
    for i in range(3):
        for t in range(5):  # position t predicts seqs[i, t+1] from seqs[i, :t+1] alone (causal)
            logp = torch.log_softmax(m(seqs[i : i + 1, : t + 1])[0, -1], dim=-1)
            ref -= float(logp[seqs[i, t + 1]])
    assert float(ta.next_char_loss(m, seqs)) == pytest.approx(ref / 15, rel=1e-12)


def test_learning_rate_schedule() -> None:
    cfg = ta.TransformerAlignmentConfig(lr=1.0, warmup=10, steps=110)
    assert ta.lr_at(0, cfg) == pytest.approx(0.1)
    assert ta.lr_at(9, cfg) == pytest.approx(1.0)
    assert ta.lr_at(10, cfg) == pytest.approx(1.0)
    assert ta.lr_at(60, cfg) == pytest.approx(0.5)  # half-way through the cosine
    assert ta.lr_at(109, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))


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
    assert set(tok) == {"mlp", "attn"} and list(tok["mlp"]) == ["L0", "L1"]
    assert tok["attn"]["L0"].shape == (20, 8)
    torch.testing.assert_close(tok["mlp"]["L1"][2 * 5 + 3], out[2, 3])  # row i·T + t is token t of window i
    torch.testing.assert_close(ta.block_features(m, seqs, "mean")["mlp"]["L1"], out.mean(dim=1))
    torch.testing.assert_close(ta.block_features(m, seqs, "last")["mlp"]["L1"], out[:, -1])


def _matrix(values: list[list[float]], null_mean: float, null_std: float) -> AlignmentMatrix:
    v = torch.tensor(values, dtype=torch.float64)
    names = tuple(f"L{i}" for i in range(v.shape[0]))
    return AlignmentMatrix(v, names, names, "m", True, null_mean=torch.full_like(v, null_mean),
                           null_std=torch.full_like(v, null_std), n_null=10)


def _predictions(mlp: AlignmentMatrix, attn: AlignmentMatrix, tmp_path) -> dict[str, bool]:
    from neurothermo.runstore import Run

    ctx = RunContext(run=Run.create(tmp_path, "t"), seed=0, quick=True)
    maps = {metric: {"mlp": mlp, "attn": attn} for _l, metric, _kw in ta.METRICS}
    ta.predict_alignment(ctx, maps)
    return {p.name.split(": ", 1)[1] if p.name.startswith("Gram Pearson:") else p.name: p.passed
            for p in ctx.predictions if p.name.startswith(("Gram Pearson", "linear CKA"))}


def test_predictions_follow_the_paper_pattern_and_can_fail(tmp_path) -> None:
    paper = _predictions(_matrix([[0.8, 0.6], [0.6, 0.7]], 0.0, 0.01),
                         _matrix([[0.5, 0.0], [-0.1, 0.05]], 0.0, 0.01), tmp_path)
    assert all(paper.values()) and len(paper) == 5
    # attention more aligned than MLP, deeper attention above the first layer: those claims fail
    reversed_ = _predictions(_matrix([[0.3, 0.2], [0.2, 0.3]], 0.0, 0.01),
                             _matrix([[0.1, 0.6], [0.6, 0.7]], 0.0, 0.01), tmp_path)
    assert not reversed_["linear CKA: mean MLP-block alignment ≥ mean attention-block alignment"]
    assert not reversed_["first-layer attention pair (A0, B0) ≥ mean of deeper attention pairs"]
    assert reversed_["linear CKA: mean MLP-block alignment exceeds the null by > 4 null std"]
    # MLP scores within 4 null std of chance: not "strongly aligned"
    chance = _predictions(_matrix([[0.03, 0.02], [0.02, 0.03]], 0.0, 0.01),
                          _matrix([[0.0, 0.0], [0.0, 0.0]], 0.0, 0.01), tmp_path)
    assert not chance["linear CKA: mean MLP-block alignment exceeds the null by > 4 null std"]
    # a difference inside the nulls' spread (2·√2·0.01 ≈ 0.028) is not a violation
    close = _predictions(_matrix([[0.5, 0.5], [0.5, 0.5]], 0.0, 0.01),
                         _matrix([[0.52, 0.52], [0.52, 0.52]], 0.0, 0.01), tmp_path)
    assert close["linear CKA: mean MLP-block alignment ≥ mean attention-block alignment"]


def test_quick_run_small(tmp_path) -> None:
    res = run_experiment("transformer-alignment", quick=True, out=tmp_path, overrides=[*TINY, "steps=150"])
    s = res.summary
    preds = {p["name"]: p for p in s["predictions"]}
    assert len(preds) == 9
    # 150 Adam steps already beat the unigram predictor (held-out ≈ 2.8 vs 3.26 nats)
    assert preds["net A: held-out loss below the unigram entropy (learned context)"]["passed"]
    assert preds["net B: held-out loss below the unigram entropy (learned context)"]["passed"]
    fig = s["figures"]
    assert fig["samples"] == 24 * 16  # pool=token: every token of every held-out window
    cka = fig["alignment"]["cka"]["mlp"]
    assert cka["rows"] == ["L0", "L1"] and len(cka["matrix"]) == 2 and cka["n_null"] == 5
    assert all(-1 <= v <= 1 for row in fig["alignment"]["gram_alignment"]["attn"]["matrix"] for v in row)
    assert set(fig["init_alignment_mean"]) == {"mutual_knn", "cka", "gram_alignment"}
    assert sorted(s["files"]) == ["training.png", "transformer_alignment.png"]
    assert (res.path / "transformer_alignment.png").stat().st_size > 10_000
    # control: two steps leave the nets at chance level (loss ≈ log V > unigram entropy)
    res = run_experiment("transformer-alignment", quick=True, out=tmp_path,
                         overrides=[*TINY, "steps=2", "warmup=0", "n_null=2"])
    assert not res.summary["predictions"][0]["passed"]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (["n_heads=5"], "n_heads=5 does not divide d_model_a=48"),
        (["k=50", "pool=mean"], "k=50 must be below the number of compared samples"),
        (["warmup=600"], "warmup=600 must be below steps=600"),
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
                                  "seq_len=8", "steps=30", "warmup=0", "eval_sequences=8",
                                  "log_every=5", "optimizer=sgd", "lr=10"])
