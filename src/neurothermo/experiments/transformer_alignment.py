"""``transformer-alignment``: MLP blocks align across independently trained transformers (§3, Fig. 4).

THEORY.md §3 (last paragraph) and §5.4. Two small pre-LN decoder-only transformers
(:class:`neurothermo.models.transformer.TinyTransformer`), with different seeds for the
initialisation and for the order of the training windows (and, if asked, different widths and
depths), are trained independently on the same task: **next-character prediction** on the
docstrings of a fixed list of Python standard-library modules and their public members (≈ 375k
characters of real English technical prose, available offline; the exact text depends on the
Python version). Every tenth docstring is held out. Loss: cross entropy in nats per character,
mean over the ``b·T`` predicted characters of a batch of ``b`` random windows of ``T + 1``
characters. Optimiser: Adam (or SGD, ``optimizer=sgd``) with linear warm-up and cosine decay to 0,
no weight decay unless asked.

Measured on ``eval_sequences`` held-out windows: each layer's attention-block output
``a_l = Attn_l(LN(x_{l−1}))`` and MLP-block output ``m_l = MLP_l(LN(y_l))`` (before the residual
add; hooks on ``blocks.l.attn`` / ``blocks.l.mlp`` through
:func:`neurothermo.alignment.capture_features`), pooled as ``pool`` says:

* ``"token"`` (default): one sample per token, ``N = eval_sequences · seq_len`` rows (every
  position of every held-out window: the representation that predicts the next character);
* ``"mean"``: one sample per window, the mean over its tokens;
* ``"last"``: one sample per window, its last token (the only one that sees the whole window).

Every (layer of A, layer of B) pair is compared, separately for MLP and attention blocks, with
three rotation-invariant metrics (:func:`neurothermo.alignment.alignment_matrix`): mutual k-NN
(cosine, ``k``), linear CKA, and the off-diagonal Pearson correlation of the Gram matrices (in
[−1, 1]: it can be negative, as the paper's colour scale). Each cell is calibrated against
``n_null`` row shuffles of B (the same shuffles for every cell).

Predictions (THEORY.md §3: "MLP-block outputs strongly aligned across networks for most layer
pairs; attention-block outputs much less aligned, many near zero or negative, except the first
layer"), with tolerances from the permutation nulls (per metric ``μ̄``, ``σ̄`` = the nulls' mean and
std averaged over the cells in question):

* both networks learned more than character frequencies: held-out loss below the entropy of the
  held-out unigram distribution;
* per metric, mean MLP-block alignment ≥ ``μ̄_mlp + 4σ̄_mlp`` (the std of a mean of cells is at
  most the mean of their stds, so this is at least a 4-sigma excess over chance);
* per metric, mean MLP-block alignment ≥ mean attention-block alignment, up to
  ``2·√(σ̄_mlp² + σ̄_attn²)`` (the scale of chance fluctuations of a difference of two scores);
* Gram Pearson: the first-layer attention pair (A₀, B₀) ≥ the mean of the deeper attention pairs
  (both indices ≥ 1), same tolerance (needs ≥ 2 layers in both nets).

The alignment of the two untrained networks (same data, same metrics, no null) is recorded as a
control: at initialisation the attention outputs are the *more* aligned ones (both nets pass the
token and position embeddings through small random maps), so the ordering is made by training.

Measured on the project's machine (seed 0; recorded, never used as targets). Quick preset
(3 layers, d = 48, 600 steps; held-out loss 2.21 nats/char vs unigram 3.26): mean MLP / attention
alignment 0.38 / 0.12 (mutual k-NN), 0.46 / 0.19 (linear CKA), 0.44 / 0.18 (Gram Pearson); first
attention pair 0.57 vs 0.18 for the deeper ones; untrained nets 0.32 / 0.42 (Gram Pearson); seeds
1 and 2 alike. Full preset (4 layers, d = 64, 3000 steps; held-out 1.53): the pattern weakens —
mutual k-NN 0.31 / 0.16, but linear CKA 0.19 / 0.18 and Gram Pearson 0.18 / 0.17, because the
MLP outputs of the middle layers fall to 0.06–0.10 while the first and last stay at 0.2–0.7; the
first-layer attention exception stays (0.65 vs 0.16). No attention cell is negative at either size.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from neurothermo import alignment as al
from neurothermo.config import setting
from neurothermo.experiments._common import public_objects, pyplot
from neurothermo.experiments.base import Experiment, RunContext, register
from neurothermo.models.transformer import TinyTransformer

MODULES = (
    "abc", "argparse", "array", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "lzma", "math", "mimetypes", "numbers", "operator", "os",
    "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "reprlib", "sched",
    "secrets", "shlex", "shutil", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "types",
    "typing", "unicodedata", "uuid", "warnings", "weakref", "zipfile", "zlib",
)
# (label, metric name, keyword arguments)
METRICS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("mutual kNN", "mutual_knn", {}),
    ("linear CKA", "cka", {}),
    ("Gram Pearson (off-diag)", "gram_alignment", {"method": "pearson_offdiag"}),
)
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
    steps: int = setting(3000, "training steps per network", min=1)
    optimizer: str = setting("adam", "optimiser", choices=("adam", "sgd"))
    lr: float = setting(3e-3, "peak learning rate (linear warm-up, cosine decay to 0)", min=1e-7, max=10.0)
    warmup: int = setting(100, "linear warm-up steps", min=0)
    weight_decay: float = setting(0.0, "torch weight decay wd (penalty (wd/2)‖θ‖²)", min=0.0)
    eval_sequences: int = setting(64, "held-out windows whose block outputs are compared", min=4)
    pool: str = setting("token", "samples: every token, or one per window (mean / last token)",
                        choices=("token", "mean", "last"))
    k: int = setting(10, "neighbours for mutual k-NN", min=1)
    n_null: int = setting(20, "row shuffles of B per cell for the permutation null", min=2)
    log_every: int = setting(50, "log the training loss every this many steps", min=1)
    threads: int = setting(1, "torch threads during the run (0: leave torch's setting); with tiny "
                              "matmuls a second thread gains ~1.3× on an idle machine but is 5–10× "
                              "slower when another process holds the other core", min=0)

    def check(self) -> None:
        for net, d in (("a", self.d_model_a), ("b", self.d_model_b)):
            if d % self.n_heads:
                raise ValueError(f"n_heads={self.n_heads} does not divide d_model_{net}={d}; "
                                 "choose n_heads dividing both widths")
        n = self.eval_sequences * (self.seq_len if self.pool == "token" else 1)
        if self.k >= n - 1:
            raise ValueError(f"k={self.k} must be below the number of compared samples minus one "
                             f"({n} with pool={self.pool!r}); raise eval_sequences or lower k")
        if self.warmup >= self.steps:
            raise ValueError(f"warmup={self.warmup} must be below steps={self.steps}")


# --------------------------------------------------------------------------- data


def docstring_corpus() -> list[str]:
    """Docstrings (``inspect.getdoc``) of ``MODULES`` and their public classes and routines.

    Deduplicated, in a fixed order (module list, then ``sorted(dir(module))``), at least 40
    characters; tabs become spaces and characters outside printable ASCII are dropped.
    """
    keep = {chr(c) for c in range(32, 127)} | {"\n"}
    seen: set[str] = set()
    docs: list[str] = []
    for obj in public_objects(MODULES, include_modules=True):
        if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        doc = inspect.getdoc(obj)
        if not doc:
            continue
        doc = "".join(c for c in doc.replace("\t", "    ") if c in keep)
        if len(doc) >= 40 and doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


@dataclass(frozen=True)
class CharData:
    """Character-level encoding: every tenth document held out, documents joined by blank lines."""

    vocab: str
    train: Tensor  # (n_train,) int64 ids
    test: Tensor  # (n_test,) int64 ids

    @classmethod
    def from_docs(cls, docs: list[str], holdout_every: int = 10) -> CharData:
        train_docs = [d for i, d in enumerate(docs) if i % holdout_every != holdout_every - 1]
        test_docs = [d for i, d in enumerate(docs) if i % holdout_every == holdout_every - 1]
        if not train_docs or not test_docs:
            raise ValueError(f"need at least {holdout_every} documents to hold one out, got {len(docs)}")
        train, test = "\n\n".join(train_docs), "\n\n".join(test_docs)
        vocab = "".join(sorted(set(train) | set(test)))
        index = {c: i for i, c in enumerate(vocab)}

        def enc(s: str) -> Tensor:
            return torch.tensor([index[c] for c in s], dtype=torch.long)

        return cls(vocab, enc(train), enc(test))


def windows(ids: Tensor, n: int, length: int, g: torch.Generator) -> Tensor:
    """``n`` windows ``ids[s : s + length]`` at uniform random starts: ``(n, length)``."""
    if ids.numel() < length:
        raise ValueError(f"text of {ids.numel()} characters is shorter than a window of {length}")
    starts = torch.randint(ids.numel() - length + 1, (n,), generator=g)
    return ids[starts.unsqueeze(1) + torch.arange(length)]


def unigram_entropy(ids: Tensor, vocab_size: int) -> float:
    """Entropy (nats) of the character frequencies of ``ids``: the best context-free predictor."""
    p = torch.bincount(ids, minlength=vocab_size).double() / ids.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def next_char_loss(model: TinyTransformer, seqs: Tensor) -> Tensor:
    """Cross entropy of predicting ``seqs[:, 1:]`` from ``seqs[:, :-1]``, mean over ``b·T`` chars."""
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))


def lr_at(step: int, cfg: TransformerAlignmentConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to 0 at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def train(model: TinyTransformer, data: CharData, cfg: TransformerAlignmentConfig,
          g: torch.Generator, ctx: RunContext, tag: str) -> list[float]:
    """Train in place; returns the training loss every ``log_every`` steps (also logged)."""
    params = list(model.parameters())
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    curve: list[float] = []
    running = torch.zeros(())
    with ctx.progress(f"training net {tag}", cfg.steps) as advance:
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = next_char_loss(model, windows(data.train, cfg.batch_size, cfg.seq_len + 1, g))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.detach()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                n = (step % cfg.log_every) + 1
                value = float(running) / n
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"net {tag}: training loss became {value} at step {step + 1}; lower lr "
                        f"(now {cfg.lr}) or use optimizer=adam")
                curve.append(value)
                ctx.log(step + 1, net=tag, train_loss=value, lr=lr_at(step, cfg))
                running.zero_()
                advance(n)
    model.eval()
    return curve


# --------------------------------------------------------------------------- measurement


def block_features(model: TinyTransformer, seqs: Tensor, pool: str) -> dict[str, dict[str, Tensor]]:
    """``{"mlp": {"L0": (N, D), …}, "attn": {…}}``: each layer's block outputs (module docstring)."""
    names = model.block_names("attn") + model.block_names("mlp")
    if pool == "token":
        feats = al.capture_features(model, seqs, layers=names, pool="flatten")
        # flatten is h.reshape(b, T·D) row-major over (T, D): back to one row per token
        d = model.tok_emb.embedding_dim
        feats = {n: f.reshape(-1, d) for n, f in feats.items()}
    else:
        feats = al.capture_features(model, seqs, layers=names, pool=pool)
    return {kind: {f"L{i}": feats[n] for i, n in enumerate(model.block_names(kind))} for kind in KINDS}


def compare(fa: dict[str, dict[str, Tensor]], fb: dict[str, dict[str, Tensor]], k: int,
            null: int, seed: int) -> dict[str, dict[str, al.AlignmentMatrix]]:
    """``{metric name: {kind: AlignmentMatrix}}`` for every metric of ``METRICS`` (``null`` shuffles)."""
    out: dict[str, dict[str, al.AlignmentMatrix]] = {}
    for _label, metric, kw in METRICS:
        extra = {"k": k} if metric == "mutual_knn" else {}
        out[metric] = {kind: al.alignment_matrix(fa[kind], fb[kind], metric, null=null,
                                                 seed=seed, **kw, **extra) for kind in KINDS}
    return out


def cell_stats(m: al.AlignmentMatrix, mask: Tensor | None = None) -> tuple[float, float, float]:
    """Mean score, mean null mean, mean null std over the cells selected by ``mask`` (all if None)."""
    assert m.null_mean is not None and m.null_std is not None
    sel = torch.ones_like(m.matrix, dtype=torch.bool) if mask is None else mask
    return (float(m.matrix[sel].mean()), float(m.null_mean[sel].mean()), float(m.null_std[sel].mean()))


def predict_alignment(ctx: RunContext, maps: dict[str, dict[str, al.AlignmentMatrix]]) -> dict[str, Any]:
    """The alignment predictions of the module docstring; returns the numbers they used."""
    out: dict[str, Any] = {}
    for label, metric, _kw in METRICS:
        mlp, attn = maps[metric]["mlp"], maps[metric]["attn"]
        s_mlp, mu_mlp, sd_mlp = cell_stats(mlp)
        s_attn, mu_attn, sd_attn = cell_stats(attn)
        tol = 2.0 * math.hypot(sd_mlp, sd_attn)
        ctx.predict(
            f"{label}: mean MLP-block alignment exceeds the null by > 4 null std",
            s_mlp, mu_mlp + 4.0 * sd_mlp, 0.0, sense="at_least",
            why="permutation null of every cell (row shuffles of B); the std of the mean over cells "
                "is at most the mean of the cells' stds, so the threshold is ≥ 4 sigma")
        ctx.predict(
            f"{label}: mean MLP-block alignment ≥ mean attention-block alignment",
            s_mlp - s_attn, 0.0, tol, sense="at_least",
            why="THEORY.md §3 (MLP outputs aligned, attention outputs much less); tolerance "
                "2·√(σ̄_mlp² + σ̄_attn²), the chance spread of a difference of two scores")
        out[metric] = {"mlp_mean": s_mlp, "mlp_null_mean": mu_mlp, "mlp_null_std": sd_mlp,
                       "attn_mean": s_attn, "attn_null_mean": mu_attn, "attn_null_std": sd_attn,
                       "mlp_z_mean": float(mlp.z.mean()), "attn_z_mean": float(attn.z.mean())}  # type: ignore[union-attr]
    attn = maps["gram_alignment"]["attn"]
    la, lb = attn.matrix.shape
    if la >= 2 and lb >= 2:
        deep = torch.zeros(la, lb, dtype=torch.bool)
        deep[1:, 1:] = True
        s_deep, _, sd_deep = cell_stats(attn, deep)
        first = float(attn.matrix[0, 0])
        sd_first = float(attn.null_std[0, 0])  # type: ignore[index]
        ctx.predict(
            "Gram Pearson: first-layer attention pair (A0, B0) ≥ mean of deeper attention pairs",
            first - s_deep, 0.0, 2.0 * math.hypot(sd_first, sd_deep), sense="at_least",
            why="THEORY.md §3 (attention outputs unaligned except the first layer); tolerance "
                "2·√(σ_first² + σ̄_deep²) from the permutation nulls")
        out["attn_first_vs_deep"] = {"first": first, "deep_mean": s_deep}
    out["attn_negative_fraction"] = float((attn.matrix < 0).double().mean())  # Gram Pearson cells < 0
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
    data = CharData.from_docs(docstring_corpus())
    V = len(data.vocab)
    held_out = windows(data.test, cfg.eval_sequences, cfg.seq_len + 1, torch.Generator().manual_seed(seeds[4]))
    ctx.log(corpus_train_chars=data.train.numel(), corpus_test_chars=data.test.numel(), vocab_size=V)
    h_unigram = unigram_entropy(data.test, V)

    nets: dict[str, TinyTransformer] = {}
    inits: dict[str, dict[str, dict[str, Tensor]]] = {}
    curves: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    for i, (tag, d, n_layers) in enumerate((("A", cfg.d_model_a, cfg.n_layers_a),
                                            ("B", cfg.d_model_b, cfg.n_layers_b))):
        model = TinyTransformer(V, d, n_layers, cfg.n_heads, max_len=cfg.seq_len,
                                activation=cfg.activation,
                                generator=torch.Generator().manual_seed(seeds[2 * i]))
        inits[tag] = block_features(model, held_out[:, :-1], cfg.pool)
        curves[tag] = train(model, data, cfg, torch.Generator().manual_seed(seeds[2 * i + 1]), ctx, tag)
        with torch.no_grad():
            losses[tag] = float(next_char_loss(model, held_out))
        ctx.predict(f"net {tag}: held-out loss below the unigram entropy (learned context)",
                    losses[tag], h_unigram, 0.0, sense="at_most",
                    why="the unigram distribution is the best predictor that ignores context; a "
                        "transformer that uses the preceding characters must beat it")
        nets[tag] = model

    feats = {tag: block_features(m, held_out[:, :-1], cfg.pool) for tag, m in nets.items()}
    maps = compare(feats["A"], feats["B"], cfg.k, cfg.n_null, seeds[4])
    numbers = predict_alignment(ctx, maps)
    init_maps = compare(inits["A"], inits["B"], cfg.k, 0, seeds[4])  # control: untrained nets
    ctx.record(
        vocab_size=V, corpus_chars={"train": data.train.numel(), "test": data.test.numel()},
        samples=next(iter(feats["A"]["mlp"].values())).shape[0],
        held_out_loss=losses, unigram_entropy=h_unigram, train_curves=curves,
        alignment={metric: {kind: m.to_dict() for kind, m in per.items()} for metric, per in maps.items()},
        summary_by_metric=numbers,
        init_alignment_mean={metric: {kind: float(m.matrix.mean()) for kind, m in per.items()}
                             for metric, per in init_maps.items()},
    )
    _figures(cfg, ctx, maps, curves, losses, h_unigram)


def _figures(cfg: TransformerAlignmentConfig, ctx: RunContext,
             maps: dict[str, dict[str, al.AlignmentMatrix]], curves: dict[str, list[float]],
             losses: dict[str, float], h_unigram: float) -> None:
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm

    fig, axes = plt.subplots(len(METRICS), 2, figsize=(10, 4.2 * len(METRICS)), squeeze=False,
                             layout="constrained")
    for row, (label, metric, _kw) in enumerate(METRICS):
        lo = min(-0.2, min(float(maps[metric][k].matrix.min()) for k in KINDS))
        norm = TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=1.0)
        for col, kind in enumerate(KINDS):
            ax, m = axes[row, col], maps[metric][kind]
            z = m.z
            im = ax.imshow(m.matrix.numpy(), cmap="RdBu_r", norm=norm)
            for i in range(len(m.rows)):
                for j in range(len(m.cols)):
                    v = float(m.matrix[i, j])
                    zz = float(z[i, j]) if z is not None else float("nan")
                    ax.text(j, i, f"{v:.2f}\nz={zz:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v) > 0.6 else "black")
            ax.set_xticks(range(len(m.cols)), [f"B:{c}" for c in m.cols])
            ax.set_yticks(range(len(m.rows)), [f"A:{r}" for r in m.rows])
            ax.set_title(f"{'MLP' if kind == 'mlp' else 'attention'} blocks — {label}", fontsize=10)
            ticks = [t / 10 for t in range(math.ceil(lo * 5) * 2, 11, 2)]
            fig.colorbar(im, ax=ax, fraction=0.046, ticks=ticks)
    fig.suptitle(f"two independently trained transformers, held-out text, pool={cfg.pool} "
                 f"(z: vs {cfg.n_null} row shuffles)")
    ctx.savefig(fig, "transformer_alignment")

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for tag, curve in curves.items():
        steps = [min((i + 1) * cfg.log_every, cfg.steps) for i in range(len(curve))]
        line = ax.plot(steps, curve, label=f"net {tag} train")[0]
        ax.axhline(losses[tag], color=line.get_color(), ls="--", lw=1, label=f"net {tag} held-out")
    ax.axhline(h_unigram, color="black", ls=":", label="unigram entropy (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / char)")
    ax.legend(fontsize=8)
    ctx.savefig(fig, "training")


EXPERIMENT = register(
    Experiment(
        name="transformer-alignment",
        title="Independently trained transformers: MLP blocks align, attention blocks much less (§3, Fig. 4)",
        config=TransformerAlignmentConfig,
        quick=TransformerAlignmentConfig(d_model_a=48, d_model_b=48, n_layers_a=3, n_layers_b=3,
                                         seq_len=32, batch_size=32, steps=600, warmup=50,
                                         eval_sequences=48),
        full=TransformerAlignmentConfig(),
        run=run,
        cost="full: 2 nets × 3000 Adam steps (4 layers, d = 64, 32 windows × 64 chars), ≈ 9 min "
             "on 1 thread of the shared 2-core machine, 0.6 GB; quick ≈ 25–40 s",
    )
)
