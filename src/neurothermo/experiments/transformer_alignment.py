"""``transformer-alignment``: after training, the MLP blocks of independently trained transformers are
far more aligned across the networks than their attention blocks, an order that learning makes
(the paper's transformer figure).

Two small pre-LN decoder-only transformers (:class:`neurothermo.models.transformer.TinyTransformer`),
with different seeds for the initialisation and for the order of the training windows (and, if
asked, different widths and depths), are trained independently on next-character prediction of
Python docstrings (:mod:`neurothermo.experiments._char_lm`: corpus, loss, optimiser, schedule).

Measured on ``eval_sequences`` held-out windows, for the trained networks AND the same networks at
their initialisation: each layer's attention-block output ``a_l = Attn_l(LN(x_{l−1}))`` and MLP-block
output ``m_l = MLP_l(LN(y_l))`` (before the residual add; hooks on ``blocks.l.attn`` /
``blocks.l.mlp``), one sample per token (``pool="token"``) or per window (``"mean"``, ``"last"``).
The blocks are labelled ``attn 0, mlp 0, attn 1, …`` in depth order, and three rotation-invariant
metrics compare every pair of blocks: mutual k-NN (cosine, ``k``), linear CKA, and the off-diagonal
Pearson correlation of the Gram matrices (in [−1, 1]; it can be negative). Maps: A vs A (within a
network) and A vs B (across networks), trained and at initialisation.

Errors. The held-out windows are dealt into ``groups`` disjoint groups (window ``i`` → group
``i mod groups``, the tokens of a window stay together) and every map is computed on each group
(:func:`neurothermo.alignment.grouped.grouped_alignment`). Every prediction is a statistic ``d`` of the
maps that is computed on the same group for trained and untrained networks, so the ``S`` group
values ``d_s`` are independent draws of held-out text: ``t = (d̄ − margin)/se`` with
``se = std(d_s)/√S`` is Student-t with ``S − 1`` degrees of freedom under "no effect", and a
prediction passes when ``d̄ > margin + t_{1−α,S−1}·se`` (one-sided level ``alpha`` per prediction;
strict, so identical trained and initial maps, ``d̄ = se = 0``, fail).
This is the spread of the measurement over held-out text for this pair of networks; the spread over
training seeds is not in it (run other seeds: the docs record them).

Predictions, on the cross-network (A vs B) maps, mean over the MLP×MLP cells (``M``) and the
attention×attention cells (``A``), trained (ᵀ) and at initialisation (ᴵ):

* each net: held-out loss below the entropy of the held-out character frequencies;
* per metric, after training the MLP blocks are more aligned than the attention blocks by more than
  ``margin``: ``Mᵀ − Aᵀ > margin`` (for the metrics in ``gap_metrics``);
* per metric, learning opens that gap: ``(Mᵀ − Aᵀ) − (Mᴵ − Aᴵ) > 0`` (for ``gap_metrics``);
* Gram Pearson: the first attention layer is the exception, ``(F − D)ᵀ > margin``, made by learning,
  ``(F − D)ᵀ − (F − D)ᴵ > 0``, with ``F`` the (attn 0, attn 0) cell and ``D`` the mean of the deeper
  attention cells (both indices ≥ 1; needs ≥ 2 layers in both nets).

Recorded, not predicted: the MLP gain ``Mᵀ − Mᴵ`` per metric (with its t), and ``M`` and ``A``
along training (``curve_steps``). The MLP gain is not a prediction because it is not robust: it
peaks early (+0.17…+0.39 on every metric within 50–100 steps), shrinks to +0.01…+0.14 by the end of
the presets (seed-dependent, not significant for mutual k-NN) and turns negative with longer training,
under Adam and SGD alike (docs/experiments/transformer-alignment.md). What learning must produce
is the order: at initialisation the attention blocks are the more aligned ones, so the gap's gain
is the test that training made it.

The untrained control: ``steps=0`` measures the networks as initialised, and every prediction must
fail (a test runs it). (``steps=1 warmup=0`` is not untrained: one Adam step moves every weight by
``±lr``, 15–30 % of its initial scale, and already lowers the deeper attention cells of small nets.)
Measured numbers: docs/experiments/transformer-alignment.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from neurothermo import alignment as al
from neurothermo.alignment.grouped import (
    GroupedAlignment,
    group_mean_se,
    grouped_alignment,
    t_threshold,
)
from neurothermo.config import setting
from neurothermo.experiments import _char_lm as lm
from neurothermo.experiments._transformer_alignment_figures import draw_figures
from neurothermo.experiments.base import Experiment, RunContext, register
from neurothermo.models.transformer import TinyTransformer

# (label, metric name, keyword arguments)
METRICS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mutual kNN", "mutual_knn", {}),
    ("linear CKA", "cka", {}),
    ("Gram Pearson", "gram_alignment", {"method": "pearson_offdiag"}),
)
METRIC_NAMES = tuple(m for _l, m, _kw in METRICS)
KINDS = ("mlp", "attn")


@dataclass(frozen=True)
class TransformerAlignmentConfig:
    d_model_a: int = setting(64, "net A: model width", min=4)
    d_model_b: int = setting(64, "net B: model width", min=4)
    n_layers_a: int = setting(4, "net A: number of blocks", min=1, max=32)
    n_layers_b: int = setting(4, "net B: number of blocks", min=1, max=32)
    n_heads: int = setting(4, "attention heads (must divide both widths)", min=1)
    activation: str = setting("gelu", "MLP nonlinearity", choices=("gelu", "relu"))
    seq_len: int = setting(64, "characters per training / held-out window T", min=2, max=1024)
    batch_size: int = setting(32, "windows per training step b", min=1)
    steps: int = setting(600, "training steps per network (0: the untrained control, every "
                              "prediction must fail)", min=0)
    optimizer: str = setting("adam", "optimiser", choices=("adam", "sgd"))
    lr: float = setting(3e-3, "peak learning rate (linear warm-up, cosine decay to 0)", min=1e-7, max=10.0)
    warmup: int = setting(50, "linear warm-up steps", min=0)
    weight_decay: float = setting(0.0, "torch weight decay wd (penalty (wd/2)‖θ‖²)", min=0.0)
    eval_sequences: int = setting(64, "held-out windows whose block outputs are compared", min=4)
    groups: int = setting(8, "disjoint groups of held-out windows; their spread gives the errors",
                          min=2)
    pool: str = setting("token", "samples: every token, or one per window (mean / last token)",
                        choices=("token", "mean", "last"))
    k: int = setting(10, "neighbours for mutual k-NN", min=1)
    margin: float = setting(0.1, "stated margin of 'MLP blocks more aligned than attention blocks'",
                            min=0.0, max=1.0)
    gap_metrics: tuple[str, ...] = setting(METRIC_NAMES, "metrics on which the MLP > attention gap "
                                           "is checked")
    alpha: float = setting(0.01, "one-sided level of each prediction's t-test", min=1e-6, max=0.2)
    curve_steps: tuple[int, ...] = setting(
        (25, 50, 100, 200, 300, 400), "checkpoints (steps, along the one schedule) at which the "
        "cross-network MLP and attention alignment is also measured: the alignment-vs-steps figure; "
        "those ≥ steps are dropped (the end of training is always a point)", min=1)
    log_every: int = setting(50, "log the training loss every this many steps", min=1)
    threads: int = setting(1, "torch threads during the run (0: leave torch's setting); with tiny "
                              "matmuls a second thread gains ~1.3× on an idle machine but is 5–10× "
                              "slower when another process holds the other core", min=0)

    def check(self) -> None:
        for net, d in (("a", self.d_model_a), ("b", self.d_model_b)):
            if d % self.n_heads:
                raise ValueError(f"n_heads={self.n_heads} does not divide d_model_{net}={d}; "
                                 "choose n_heads dividing both widths")
        if self.eval_sequences < 2 * self.groups:
            raise ValueError(f"eval_sequences={self.eval_sequences} gives fewer than two windows per "
                             f"group (groups={self.groups}); raise eval_sequences or lower groups")
        per_group = self.eval_sequences // self.groups * (self.seq_len if self.pool == "token" else 1)
        if self.k >= per_group - 1:
            raise ValueError(f"k={self.k} must be below the samples per group minus one ({per_group} "
                             f"with pool={self.pool!r}, groups={self.groups}); raise eval_sequences, "
                             "lower groups or lower k")
        if self.steps and self.warmup >= self.steps:
            raise ValueError(f"warmup={self.warmup} must be below steps={self.steps}")
        bad = [m for m in self.gap_metrics if m not in METRIC_NAMES]
        if bad or not self.gap_metrics:
            raise ValueError(f"gap_metrics={','.join(self.gap_metrics)}: choose one or more of "
                             f"{','.join(METRIC_NAMES)}")


# --------------------------------------------------------------------------- measurement


def block_features(model: TinyTransformer, seqs: Tensor, pool: str) -> dict[str, Tensor]:
    """``{"attn 0": (N, D), "mlp 0": …, "attn 1": …}``: every block output in depth order.

    ``pool="token"``: row ``i·T + t`` is token ``t`` of window ``i``; else one row per window.
    """
    names = {f"{kind} {i}": f"blocks.{i}.{kind}" for i in range(len(model.blocks)) for kind in ("attn", "mlp")}
    if pool == "token":
        feats = al.capture_features(model, seqs, layers=list(names.values()), pool="flatten")
        # flatten is h.reshape(b, T·D) row-major over (T, D): back to one row per token
        d = model.tok_emb.embedding_dim
        feats = {n: f.reshape(-1, d) for n, f in feats.items()}
    else:
        feats = al.capture_features(model, seqs, layers=list(names.values()), pool=pool)
    return {label: feats[n] for label, n in names.items()}


def sample_groups(n_windows: int, seq_len: int, groups: int, pool: str) -> Tensor:
    """Group label of every sample: window ``i`` → ``i mod groups`` (its tokens stay together)."""
    per_window = torch.arange(n_windows) % groups
    return per_window.repeat_interleave(seq_len) if pool == "token" else per_window


def maps_for(fa: dict[str, Tensor], fb: dict[str, Tensor] | None, groups: Tensor,
             k: int) -> dict[str, GroupedAlignment]:
    """``{metric name: GroupedAlignment}`` over every block pair (``fb=None``: A vs A)."""
    return {metric: grouped_alignment(fa, fb, metric, groups, **kw, **({"k": k} if metric == "mutual_knn" else {}))
            for _label, metric, kw in METRICS}


def _cells(g: GroupedAlignment, kind_row: str, kind_col: str, skip_first: bool = False) -> Tensor:
    """Per-group mean over the cells (``kind_row i``, ``kind_col j``): ``(S,)`` (indices ≥ 1 if asked)."""
    r = [i for i, n in enumerate(g.rows) if n.startswith(kind_row) and not (skip_first and n.endswith(" 0"))]
    c = [j for j, n in enumerate(g.cols) if n.startswith(kind_col) and not (skip_first and n.endswith(" 0"))]
    return g.per_group[:, r][:, :, c].mean(dim=(1, 2))


def block_means(g: GroupedAlignment) -> dict[str, Tensor]:
    """Per-group means: ``"mlp"`` (MLP×MLP cells), ``"attn"``, and, when both nets have ≥ 2 layers,
    ``"first_minus_deep"`` = (attn 0, attn 0) − mean of the attention cells with both indices ≥ 1."""
    out = {kind: _cells(g, kind, kind) for kind in KINDS}
    ra = [i for i, n in enumerate(g.rows) if n.startswith("attn")]
    ca = [j for j, n in enumerate(g.cols) if n.startswith("attn")]
    if len(ra) >= 2 and len(ca) >= 2:
        out["first_minus_deep"] = g.per_group[:, ra[0], ca[0]] - _cells(g, "attn", "attn", skip_first=True)
    return out


def alignment_along(along: dict[str, dict[int, dict[str, Tensor]]], steps: list[int], groups: Tensor,
                    k: int) -> dict[str, Any]:
    """Cross-network block means along training: ``{"steps": [...], metric: {"mlp": [(mean, se), …],
    "attn": […]}}``, mean over the MLP×MLP (attention×attention) cells, ± standard error over groups."""
    out: dict[str, Any] = {"steps": list(steps)}
    for metric in METRIC_NAMES:
        out[metric] = {kind: [] for kind in KINDS}
    for s in steps:
        maps = maps_for(along["A"][s], along["B"][s], groups, k)
        for metric in METRIC_NAMES:
            means = block_means(maps[metric])
            for kind in KINDS:
                out[metric][kind].append(group_mean_se(means[kind]))
    return out


def predict_alignment(ctx: RunContext, cfg: TransformerAlignmentConfig, trained: dict[str, GroupedAlignment],
                      init: dict[str, GroupedAlignment]) -> dict[str, Any]:
    """The alignment predictions of the module docstring; returns the numbers they used."""
    out: dict[str, Any] = {}
    n_groups = next(iter(trained.values())).n_groups
    t_star = t_threshold(n_groups, cfg.alpha)
    level = (f"one-sided t-test at level {cfg.alpha} over the {n_groups} held-out groups "
             f"(t ≥ {t_star:.2f}, {n_groups - 1} dof): the statistic is computed on the same group for "
             "trained and initial networks, so its spread over groups is the measurement's error")

    def check(name: str, values: Tensor, margin: float, why: str) -> dict[str, float | None]:
        mean, se = group_mean_se(values)
        # strictly above margin + t*·se (equal trained and initial maps, se = 0, must fail)
        ctx.predict(name, mean, math.nextafter(margin + t_star * se, math.inf), 0.0, sense="at_least",
                    why=f"{why}; {level}")
        diff = mean - margin
        t = diff / se if se > 0 else (math.copysign(math.inf, diff) if diff else None)  # None: 0/0
        return {"mean": mean, "se": se, "t": t}

    for label, metric, _kw in METRICS:
        tr, ini = block_means(trained[metric]), block_means(init[metric])
        rec: dict[str, Any] = {f"{kind}_{when}": group_mean_se(v[kind])
                               for when, v in (("trained", tr), ("init", ini)) for kind in KINDS}
        gain_mean, gain_se = group_mean_se(tr["mlp"] - ini["mlp"])  # recorded, not predicted (docstring)
        rec["mlp_gain"] = {"mean": gain_mean, "se": gain_se, "t": gain_mean / gain_se if gain_se > 0 else None}
        if metric in cfg.gap_metrics:
            gap_t, gap_i = tr["mlp"] - tr["attn"], ini["mlp"] - ini["attn"]
            rec["gap_trained"] = check(
                f"{label}: trained MLP blocks more aligned than attention blocks by > {cfg.margin:g}",
                gap_t, cfg.margin,
                "MLP outputs strongly aligned across networks, attention outputs much less; the margin "
                "is the stated size of 'much less', not fitted")
            rec["gap_gain"] = check(
                f"{label}: learning opens the MLP − attention gap (trained gap − initial gap > 0)",
                gap_t - gap_i, 0.0, "the ordering must be made by training, not by the architecture")
        out[metric] = rec
    tr, ini = block_means(trained["gram_alignment"]), block_means(init["gram_alignment"])
    if "first_minus_deep" in tr:
        why = "attention outputs are much less aligned except in the first layer"
        out["first_attention"] = {
            "trained": check(f"Gram Pearson: trained first attention layer more aligned than the deeper ones "
                             f"by > {cfg.margin:g}", tr["first_minus_deep"], cfg.margin,
                             f"{why}; the margin is the stated size of 'much less'"),
            "gain": check("Gram Pearson: learning singles out the first attention layer (gain of "
                          "attn 0 − deeper > 0)", tr["first_minus_deep"] - ini["first_minus_deep"], 0.0,
                          f"{why}: at initialisation every attention layer reads nearly the same input"),
        }
    attn = trained["gram_alignment"]
    mask = torch.tensor([r.startswith("attn") for r in attn.rows])[:, None] & \
        torch.tensor([c.startswith("attn") for c in attn.cols])[None, :]
    out["attn_negative_fraction"] = float((attn.mean[mask] < 0).double().mean())
    return out


def run(cfg: TransformerAlignmentConfig, ctx: RunContext) -> None:
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        _run(cfg, ctx)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TransformerAlignmentConfig, ctx: RunContext) -> None:
    g = torch.Generator().manual_seed(ctx.seed)
    seeds = [int(s) for s in torch.randint(2**31 - 1, (5,), generator=g)]
    data = lm.CharData.from_docs(lm.docstring_corpus())
    V = len(data.vocab)
    held_out = lm.windows(data.test, cfg.eval_sequences, cfg.seq_len + 1, torch.Generator().manual_seed(seeds[4]))
    ctx.log(corpus_train_chars=data.train.numel(), corpus_test_chars=data.test.numel(), vocab_size=V)
    h_unigram = lm.unigram_entropy(data.test, V)
    groups = sample_groups(cfg.eval_sequences, cfg.seq_len, cfg.groups, cfg.pool)

    feats: dict[str, dict[str, dict[str, Tensor]]] = {"init": {}, "trained": {}}
    marks = sorted({s for s in cfg.curve_steps if s < cfg.steps})
    along: dict[str, dict[int, dict[str, Tensor]]] = {}  # net → step → block features
    curves: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    along_loss: dict[str, dict[int, float]] = {}
    for i, (tag, d, n_layers) in enumerate((("A", cfg.d_model_a, cfg.n_layers_a),
                                            ("B", cfg.d_model_b, cfg.n_layers_b))):
        model = TinyTransformer(V, d, n_layers, cfg.n_heads, max_len=cfg.seq_len,
                                activation=cfg.activation,
                                generator=torch.Generator().manual_seed(seeds[2 * i]))
        feats["init"][tag] = block_features(model, held_out[:, :-1], cfg.pool)
        along[tag], along_loss[tag] = {}, {}

        def measure(step: int, model: TinyTransformer = model, tag: str = tag) -> None:
            if step and step not in marks:
                return
            with torch.no_grad():
                along[tag][step] = block_features(model, held_out[:, :-1], cfg.pool)
                along_loss[tag][step] = float(lm.next_char_loss(model, held_out))

        measure(0)
        with ctx.progress(f"training net {tag}", cfg.steps) as advance:
            curves[tag] = lm.train(model, data, cfg, torch.Generator().manual_seed(seeds[2 * i + 1]),
                                   tag, ctx.log, advance,
                                   after_step=measure)
        with torch.no_grad():
            losses[tag] = float(lm.next_char_loss(model, held_out))
        ctx.predict(f"net {tag}: held-out loss below the unigram entropy (learned context)",
                    losses[tag], h_unigram, 0.0, sense="at_most",
                    why="the unigram distribution is the best predictor that ignores context; a "
                        "transformer that uses the preceding characters must beat it")
        feats["trained"][tag] = block_features(model, held_out[:, :-1], cfg.pool)
        along[tag][cfg.steps], along_loss[tag][cfg.steps] = feats["trained"][tag], losses[tag]

    maps = {when: {"cross": maps_for(f["A"], f["B"], groups, cfg.k), "within": maps_for(f["A"], None, groups, cfg.k)}
            for when, f in ctx.track(feats.items(), "comparing blocks")}
    numbers = predict_alignment(ctx, cfg, maps["trained"]["cross"], maps["init"]["cross"])
    along_steps = sorted(along["A"])
    steps_curve = alignment_along(along, along_steps, groups, cfg.k)
    steps_curve["held_out_loss"] = {tag: [along_loss[tag][s] for s in along_steps] for tag in along_loss}
    ctx.record(
        vocab_size=V, corpus_chars={"train": data.train.numel(), "test": data.test.numel()},
        samples_per_group=int(torch.bincount(groups).min()), n_groups=cfg.groups,
        held_out_loss=losses, unigram_entropy=h_unigram, train_curves=curves,
        alignment={when: {side: {metric: m.to_dict() for metric, m in per.items()} for side, per in by.items()}
                   for when, by in maps.items()},
        summary_by_metric=numbers, alignment_vs_steps=steps_curve,
    )
    draw_figures(ctx, cfg, maps, numbers, curves, losses, h_unigram, steps_curve)


EXPERIMENT = register(
    Experiment(
        name="transformer-alignment",
        title="Independently trained transformers: learning puts MLP blocks far above attention blocks",
        config=TransformerAlignmentConfig,
        quick=TransformerAlignmentConfig(d_model_a=48, d_model_b=48, n_layers_a=3, n_layers_b=3,
                                         seq_len=32, batch_size=32, steps=600, warmup=50,
                                         eval_sequences=48),
        full=TransformerAlignmentConfig(),
        run=run,
        cost="full: 2 nets × 600 Adam steps (4 layers, d = 64, 32 windows × 64 chars), 12 block maps per "
             "metric and 6 checkpoints along training: 98 s CPU on 1 thread (measured, seed 0), 0.6 GB; "
             "quick 31–33 s CPU. Longer training loses the MLP > attention order (see the docs)",
    )
)
