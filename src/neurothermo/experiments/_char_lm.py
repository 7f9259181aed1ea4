"""Character-level language modelling on Python docstrings: the data and training loop of
``transformer-alignment``.

Corpus: the docstrings (``inspect.getdoc``) of a fixed list of standard-library modules and their
public classes and routines (≈ 375k characters of English technical prose, available offline; the
exact text depends on the Python version). Every tenth docstring is held out.

Loss: cross entropy in nats per character, mean over the ``b·T`` predicted characters of a batch of
``b`` random windows of ``T + 1`` characters. Optimiser: Adam (or SGD) with torch's coupled
``weight_decay`` ``wd`` (the gradient gains ``wd·θ``: a penalty ``(wd/2)‖θ‖²``, not AdamW), linear
warm-up and cosine decay of the learning rate to 0.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurothermo.experiments._common import public_objects

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


def next_char_loss(model: nn.Module, seqs: Tensor) -> Tensor:
    """Cross entropy of predicting ``seqs[:, 1:]`` from ``seqs[:, :-1]``, mean over ``b·T`` chars."""
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))


class Schedule(Protocol):
    """What :func:`lr_at` reads (any frozen config with these fields)."""

    @property
    def steps(self) -> int: ...
    @property
    def warmup(self) -> int: ...
    @property
    def lr(self) -> float: ...


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to 0 at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


class TrainConfig(Schedule, Protocol):
    """What :func:`train` reads, besides the schedule."""

    @property
    def optimizer(self) -> str: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def log_every(self) -> int: ...


def train(model: nn.Module, data: CharData, cfg: TrainConfig, g: torch.Generator, tag: str,
          log: Callable[..., None], advance: Callable[[int], None],
          after_step: Callable[[int], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``cfg.steps`` steps; returns the mean training loss of every
    ``log_every`` steps (each also passed to ``log(step, net=…, train_loss=…, lr=…)``).
    ``after_step(s)``, if given, is called after step ``s = 1 … steps`` (e.g. to measure checkpoints).

    Raises:
        FloatingPointError: the training loss became NaN or infinite (names the step and the way out).
    """
    params = list(model.parameters())
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    curve: list[float] = []
    running = torch.zeros(())
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = next_char_loss(model, windows(data.train, cfg.batch_size, cfg.seq_len + 1, g))
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
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
            log(step + 1, net=tag, train_loss=value, lr=lr_at(step, cfg))
            running.zero_()
            advance(n)
        if after_step is not None:
            after_step(step + 1)
    model.eval()
    return curve
