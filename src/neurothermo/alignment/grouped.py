"""Alignment maps on disjoint groups of samples, with standard errors from their spread.

A permutation null answers "is this more than chance pairing?"; it says nothing about how much a
score would move on other samples, which is what a comparison of two scores on the same samples
(trained vs initial networks, MLP vs attention blocks) needs. ``grouped_alignment`` splits the N
samples into ``S`` disjoint groups (e.g. one group per few held-out text windows, so that the
tokens of a window stay together), computes the layer × layer map on each group, and keeps the
``(S, L_a, L_b)`` stack.

For any statistic ``d`` of a map (a mean over cells, a difference of two maps computed on the same
groups, …) the groups give ``S`` independent, identically distributed values ``d_1 … d_S`` when the
groups are drawn independently from the same source; their mean ``d̄`` estimates ``E[d]`` at group
size ``N/S`` and ``se = std(d_s, ddof=1)/√S`` is its standard error; ``t = d̄/se`` follows Student's
t with ``S − 1`` degrees of freedom when the ``d_s`` are normal (:func:`group_mean_se`,
:func:`t_threshold`). Note that every metric is evaluated at the group size ``N/S``: k-NN and CKA
values depend on the number of samples, so compare only maps with the same group size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from neurothermo._validate import check_int
from neurothermo.alignment.matrix import AlignmentMatrix, Features, alignment_matrix


@dataclass(frozen=True)
class GroupedAlignment:
    """Layer × layer maps on ``S`` disjoint groups of samples: ``per_group`` is ``(S, L_a, L_b)``.

    ``mean`` is the ``(L_a, L_b)`` map averaged over groups and ``se`` its per-cell standard error
    ``std(ddof=1)/√S``; ``matrix()`` returns the mean as an :class:`AlignmentMatrix`. Returned
    by :func:`grouped_alignment`.

    Attributes:
        per_group: ``(S, L_a, L_b)`` scores, one map per group.
        rows: the layer names of A.
        cols: the layer names of B.
        metric: the metric's name.
        higher_is_more_aligned: the direction of the score.
        group_size: the number of samples of each group.
        params: the metric's keyword arguments.
    """

    per_group: Tensor
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    metric: str
    higher_is_more_aligned: bool
    group_size: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        return int(self.per_group.shape[0])

    @property
    def mean(self) -> Tensor:
        return self.per_group.mean(dim=0)

    @property
    def se(self) -> Tensor:
        result: Tensor = self.per_group.std(dim=0) / self.n_groups**0.5
        return result

    def matrix(self) -> AlignmentMatrix:
        return AlignmentMatrix(self.mean, self.rows, self.cols, self.metric,
                               self.higher_is_more_aligned, dict(self.params))

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "params": dict(self.params), "rows": list(self.rows),
                "cols": list(self.cols), "matrix": self.mean.tolist(), "se": self.se.tolist(),
                "n_groups": self.n_groups, "group_size": list(self.group_size)}


def grouped_alignment(
    features_a: Features, features_b: Features | None, metric: str | Callable[..., float],
    groups: Tensor, **kw: Any,
) -> GroupedAlignment:
    """:func:`alignment_matrix` on each group of samples (see the module docstring).

    Args:
        features_a: dict layer name → ``(N, D)`` features.
        features_b: the same for the second model (``None``: A against A).
        metric: a built-in metric name or function (as for :func:`alignment_matrix`).
        groups: ``(N,)`` integer group labels ``0 … S−1``, every label used, ``S ≥ 2``.
        **kw: keyword arguments of the metric.

    Returns:
        A :class:`GroupedAlignment` with the ``(S, L_a, L_b)`` maps.

    Raises:
        ValueError: ``groups`` has the wrong shape, skips a label or has fewer than two groups; or
            the metric refuses a group (too few samples for ``k``, constant features, …).

    Example:
        >>> import torch
        >>> from neurothermo.alignment.grouped import grouped_alignment
        >>> x = {"h": torch.randn(40, 5)}
        >>> g = grouped_alignment(x, {"h": x["h"] @ torch.randn(5, 5)}, "cka", torch.arange(40) % 4)
        >>> g.per_group.shape
        torch.Size([4, 1, 1])
    """
    first = next(iter(features_a.values() if isinstance(features_a, dict) else features_a))
    n = int(first.shape[0])
    groups = torch.as_tensor(groups)
    if groups.shape != (n,) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"groups must be an integer tensor of shape ({n},) (one label per sample), "
                         f"got {groups.dtype} of shape {tuple(groups.shape)}")
    groups = groups.cpu()
    s = int(groups.max()) + 1 if n else 0
    counts = torch.bincount(groups, minlength=s) if n and int(groups.min()) >= 0 else None
    if counts is None or s < 2 or bool((counts == 0).any()):
        raise ValueError("groups must label every sample with 0 … S−1, each label used, S >= 2 "
                         "(a standard error needs at least two groups)")
    maps = []
    for label in range(s):
        idx = (groups == label).nonzero().squeeze(1)

        def take(f: Features, idx: Tensor = idx) -> dict[str, Tensor]:
            items = f.items() if isinstance(f, dict) else enumerate(f)
            return {str(k): torch.as_tensor(v)[idx.to(torch.as_tensor(v).device)] for k, v in items}

        sub_a = take(features_a)
        sub_b = None if features_b is None or features_b is features_a else take(features_b)
        try:
            maps.append(alignment_matrix(sub_a, sub_b, metric, **kw))
        except ValueError as exc:
            raise ValueError(f"group {label} ({int(counts[label])} samples): {exc}") from None
    m0 = maps[0]
    return GroupedAlignment(torch.stack([m.matrix for m in maps]), m0.rows, m0.cols, m0.metric,
                            m0.higher_is_more_aligned, tuple(int(c) for c in counts), dict(kw))


def group_mean_se(values: Tensor) -> tuple[float, float]:
    """Mean of ``S`` per-group values and its standard error ``std(ddof=1)/√S`` (``S ≥ 2``)."""
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"need a 1-D tensor of at least two group values, got shape {tuple(values.shape)}")
    v = values.to(torch.float64)
    return float(v.mean()), float(v.std() / v.numel() ** 0.5)


def t_threshold(n_groups: int, alpha: float) -> float:
    """One-sided Student-t quantile ``t_{1−α, S−1}``: ``mean/se`` of ``S`` normal group values
    whose true mean is 0 exceeds it with probability ``α``."""
    from scipy.stats import t

    check_int("n_groups", n_groups, minimum=2)
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
    return float(t.ppf(1.0 - alpha, n_groups - 1))
