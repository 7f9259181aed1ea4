"""Permutation null: how much alignment do unpaired samples already show?

Width, depth and dimension inflate every similarity index (biased CKA of two independent random
layers is far from 0 when D is comparable to N). The permutation null answers "is this more than
chance": shuffle the rows of B with ``n`` random permutations ``π`` (breaking the pairing of
samples, keeping each layer's geometry) and recompute the metric. Reported:

* ``null_mean``, ``null_std`` (ddof = 1) of the ``n`` shuffled scores;
* ``z = (score − null_mean)/null_std`` (``±inf`` if the null has no spread and the score differs;
  0 if it equals the null);
* the one-sided permutation p-value ``(1 + #{null ⪰ score})/(n + 1)`` (Phipson & Smyth 2010; never
  0, at least ``1/(n+1)``), where ``⪰`` is ``≥`` for similarities and ``≤`` for distances.

For the registered metrics (``mutual_knn``, ``cka``, … or their names) each layer's statistics are
computed once and permuted (neighbour lists are relabelled, not recomputed), so ``n`` shuffles cost
``n`` cheap comparisons; any other callable ``metric(A, B) -> float`` is simply called ``n + 1``
times.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from neurothermo._validate import check_int
from neurothermo.alignment._common import as_features, check_pair
from neurothermo.alignment._spec import build, lookup


@dataclass(frozen=True)
class PermutationNull:
    """A score with its permutation null (see the module docstring).

    Returned by :func:`permutation_null`; ``excess`` is the score beyond the null's mean (sign
    flipped for distances).

    Attributes:
        metric: the metric's name.
        score: ``metric(A, B)``.
        null_mean: the mean of the shuffled scores.
        null_std: their standard deviation (``ddof=1``).
        z: ``(score − null_mean) / null_std`` (±inf when the null has no spread).
        p_value: ``(1 + #{null at least as extreme as score}) / (n + 1)``, one-sided.
        n: the number of shuffles.
        higher_is_more_aligned: the direction of the score.
        null: the shuffled scores.
    """

    metric: str
    score: float
    null_mean: float
    null_std: float
    z: float
    p_value: float
    n: int
    higher_is_more_aligned: bool
    null: tuple[float, ...]

    @property
    def excess(self) -> float:
        """``score − null_mean`` (negative of it for distances): alignment beyond chance."""
        d = self.score - self.null_mean
        return d if self.higher_is_more_aligned else -d


def summarize(metric: str, score: float, null: Tensor, higher: bool) -> PermutationNull:
    null = null.to(torch.float64).cpu()
    n = null.numel()
    mean = float(null.mean())
    std = float(null.std()) if n > 1 else 0.0
    diff = score - mean
    if std > 0:
        z = diff / std
    else:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    extreme = int((null >= score).sum()) if higher else int((null <= score).sum())
    return PermutationNull(
        metric=metric, score=float(score), null_mean=mean, null_std=std, z=z,
        p_value=(1 + extreme) / (n + 1), n=n, higher_is_more_aligned=higher,
        null=tuple(float(v) for v in null),
    )


def permutations(n_samples: int, n: int, seed: int, device: torch.device) -> list[Tensor]:
    """``n`` seeded random permutations of ``range(n_samples)`` (drawn on the CPU: reproducible)."""
    gen = torch.Generator().manual_seed(int(seed))
    return [torch.randperm(n_samples, generator=gen).to(device) for _ in range(n)]


def permutation_null(
    metric: str | Callable[..., float], A: Any, B: Any, *, n: int = 100, seed: int = 0,
    higher_is_more_aligned: bool | None = None, **kw: Any,
) -> PermutationNull:
    """Score ``metric(A, B, **kw)`` against ``n`` row-shuffles of ``B`` (see the module docstring).

    ``metric`` is a metric name (``"cka"``), one of this package's metric functions, or any
    callable ``(A, B) -> float``. ``higher_is_more_aligned`` is known for the built-in metrics
    (``False`` only for ``procrustes_distance``) and defaults to ``True`` for other callables.

    Args:
        metric: a metric name, a metric function of this package, or ``(A, B) -> float``.
        A: ``(N, D_a)`` features.
        B: ``(N, D_b)`` features of the same samples.
        n: the number of row shuffles of ``B`` (≥ 2).
        seed: seed of the shuffles.
        higher_is_more_aligned: the direction of the score; None: known or True.
        **kw: keyword arguments of the metric.

    Returns:
        A :class:`PermutationNull`: the score, the null's mean and std, ``z`` and the
        permutation ``p_value = (1 + #{null at least as extreme}) / (n + 1)``.

    Raises:
        TypeError: ``metric`` neither a name nor a callable, features of the wrong type,
            keyword arguments a built-in metric does not take.
        ValueError: an unknown metric name, a ``functools.partial`` of a built-in metric with
            arguments, ``n`` < 2, or what the metric raises.
        FloatingPointError: the metric returned a non-finite value.

    Example:
        >>> import torch
        >>> from neurothermo.alignment import permutation_null
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(60, 5)
        >>> res = permutation_null("cka", A, A @ torch.randn(5, 5), n=20)
        >>> res.p_value == 1 / 21, res.z > 3  # no shuffle comes close
        (True, True)
    """
    check_int("n", n, minimum=2)
    a = as_features(A, "A")
    b = as_features(B, "B")
    check_pair(a, b)
    found = lookup(metric)
    perms = permutations(a.shape[0], n, seed, a.device)
    with torch.no_grad():
        if found is not None:
            name, cls = found
            m = build(cls, name, kw)
            sa, sb = m.prepare(a, "A"), m.prepare(b, "B")
            score = float(m.compare(sa, sb))
            null = torch.stack([m.compare(sa, m.permute(sb, p)) for p in perms])
            higher = m.higher_is_more_aligned if higher_is_more_aligned is None else higher_is_more_aligned
        else:
            if not callable(metric):
                raise TypeError(f"metric must be a name or a callable, got {type(metric).__name__}")
            name = getattr(metric, "__name__", type(metric).__name__)
            score = float(metric(a, b, **kw))
            null = torch.tensor([float(metric(a, b[p], **kw)) for p in perms], dtype=torch.float64)
            higher = True if higher_is_more_aligned is None else higher_is_more_aligned
    if not math.isfinite(score) or not bool(torch.isfinite(null).all()):
        raise FloatingPointError(f"metric {name!r} returned a non-finite value")
    return summarize(name, score, null, bool(higher))
