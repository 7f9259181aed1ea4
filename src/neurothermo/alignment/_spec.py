"""The two-stage form every metric shares: per-layer statistics, then a cheap pair comparison.

A metric is a class built from its keyword arguments with three methods:

* ``prepare(x, name) -> stat``: everything that depends on one layer only (neighbour lists,
  centred features, a U-centred kernel, an SVD basis) — computed once per layer;
* ``compare(stat_a, stat_b) -> Tensor``: the 0-d float64 score of one pair;
* ``permute(stat, perm) -> stat``: the statistic of ``x[perm]`` without recomputing it (the
  permutation null relabels neighbour lists instead of redoing a Gram matrix).

The public functions (``mutual_knn``, ``cka``, …) are thin wrappers; ``alignment_matrix`` and
``permutation_null`` use the classes directly so that nothing is computed twice.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from neurothermo.alignment._common import as_features, check_pair


class Metric(Protocol):
    name: str
    higher_is_more_aligned: bool
    symmetric: bool

    def prepare(self, x: Tensor, name: str) -> Any: ...

    def compare(self, sa: Any, sb: Any) -> Tensor: ...

    def permute(self, stat: Any, perm: Tensor) -> Any: ...


_BY_NAME: dict[str, tuple[Callable[..., float], type]] = {}
_BY_FUNC: dict[Callable[..., float], str] = {}


def register(name: str, func: Callable[..., float], cls: type) -> None:
    _BY_NAME[name] = (func, cls)
    _BY_FUNC[func] = name


def metric_names() -> list[str]:
    return sorted(_BY_NAME)


def lookup(metric: str | Callable[..., float]) -> tuple[str, type] | None:
    """The registered metric for a name or public function (``functools.partial`` unwrapped)."""
    kw: dict[str, Any] = {}
    if isinstance(metric, str):
        if metric not in _BY_NAME:
            raise ValueError(f"unknown metric {metric!r}; available: {', '.join(metric_names())}")
        return metric, _BY_NAME[metric][1]
    func = getattr(metric, "func", metric)  # functools.partial
    kw = dict(getattr(metric, "keywords", {}) or {})
    name = _BY_FUNC.get(func)
    if name is None:
        return None
    if kw or getattr(metric, "args", None):
        raise ValueError(
            "pass the metric's keyword arguments to this function (…, metric=mutual_knn, k=5), "
            "not through functools.partial"
        )
    return name, _BY_NAME[name][1]


def build(cls: type, name: str, kw: dict[str, Any]) -> Metric:
    try:
        metric: Metric = cls(**kw)
    except TypeError as exc:
        raise TypeError(f"metric {name!r}: {exc}") from None
    return metric


def pairwise(metric: Metric, a: Any, b: Any) -> float:
    """``compare(prepare(A), prepare(B))`` with the shared input checks."""
    a = as_features(a, "A")
    b = as_features(b, "B")
    check_pair(a, b)
    with torch.no_grad():
        value = metric.compare(metric.prepare(a, "A"), metric.prepare(b, "B"))
    return float(value)
