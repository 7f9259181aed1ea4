"""Layer × layer alignment maps, with each layer's statistics computed once.

``alignment_matrix(features_a, features_b, metric)`` compares every layer of model A with every
layer of model B. Each layer's per-layer statistic (neighbour lists for k-NN metrics, centred
features for CKA, an SVD basis for SVCCA, …) is computed once — ``L_a + L_b`` Gram-sized
computations instead of ``2·L_a·L_b`` as in platonic-rep — and every cell is a cheap comparison.

Summaries (platonic-rep's names in quotes): ``.matrix`` is the full ``(L_a, L_b)`` table;
``.max`` its largest entry — platonic-rep's **"model alignment"** of two models is this maximum
over all layer pairs; ``.diagonal`` the same-index pairs ``(i, i)`` for ``i < min(L_a, L_b)``,
meaningful only when the two models' layers correspond; ``.best`` the most aligned entry (the max
for similarities, the min for distances such as the Procrustes distance).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from neurothermo._validate import check_int
from neurothermo.alignment._common import as_features
from neurothermo.alignment._spec import build, lookup, metric_names
from neurothermo.alignment.null import permutations

Features = Mapping[str, Any] | Sequence[Any]


@dataclass(frozen=True)
class AlignmentMatrix:
    """A labelled ``(L_a, L_b)`` alignment table (float64, CPU), optionally with its permutation null.

    ``null_mean``/``null_std`` (when ``null > 0`` was asked) are per-cell over the same ``n_null``
    row shuffles of B; ``z`` is ``(matrix − null_mean)/null_std``. Returned by
    :func:`alignment_matrix`.

    Attributes:
        matrix: ``(L_a, L_b)`` scores.
        rows: the layer names of A.
        cols: the layer names of B.
        metric: the metric's name.
        higher_is_more_aligned: the direction of the score.
        params: the metric's keyword arguments.
        null_mean: per-cell mean of the null, or None.
        null_std: per-cell standard deviation of the null, or None.
        n_null: the number of shuffles (0: no null).
    """

    matrix: Tensor
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    metric: str
    higher_is_more_aligned: bool
    params: dict[str, Any] = field(default_factory=dict)
    null_mean: Tensor | None = None
    null_std: Tensor | None = None
    n_null: int = 0

    @property
    def max(self) -> float:
        """Largest entry: platonic-rep's "model alignment" (max over all layer pairs)."""
        return float(self.matrix.max())

    @property
    def argmax(self) -> tuple[str, str]:
        i = int(self.matrix.argmax())
        return self.rows[i // len(self.cols)], self.cols[i % len(self.cols)]

    @property
    def best(self) -> float:
        """The most aligned entry: the max for similarities, the min for distances."""
        return self.max if self.higher_is_more_aligned else float(self.matrix.min())

    @property
    def best_pair(self) -> tuple[str, str]:
        if self.higher_is_more_aligned:
            return self.argmax
        i = int(self.matrix.argmin())
        return self.rows[i // len(self.cols)], self.cols[i % len(self.cols)]

    @property
    def diagonal(self) -> Tensor:
        """Same-index pairs ``(i, i)``, ``i < min(L_a, L_b)``."""
        return torch.diagonal(self.matrix).clone()

    @property
    def z(self) -> Tensor | None:
        if self.null_mean is None or self.null_std is None:
            return None
        diff = self.matrix - self.null_mean
        # no spread: 0 where the score equals the null, ±inf otherwise (never NaN)
        flat = torch.where(diff > 0, torch.inf, torch.where(diff < 0, -torch.inf, 0.0))
        return torch.where(self.null_std > 0, diff / self.null_std, flat)

    def value(self, row: str, col: str) -> float:
        return float(self.matrix[self.rows.index(row), self.cols.index(col)])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric, "params": dict(self.params), "rows": list(self.rows),
            "cols": list(self.cols), "matrix": self.matrix.tolist(), "max": self.max,
            "argmax": list(self.argmax), "diagonal": self.diagonal.tolist(),
        }
        if self.null_mean is not None and self.null_std is not None:
            out.update(null_mean=self.null_mean.tolist(), null_std=self.null_std.tolist(),
                       n_null=self.n_null)
        return out


def _as_layers(features: Features, side: str) -> dict[str, Tensor]:
    if isinstance(features, Mapping):
        items = [(str(k), v) for k, v in features.items()]
    elif isinstance(features, Sequence) and not isinstance(features, str | bytes):
        items = [(str(i), v) for i, v in enumerate(features)]
    else:
        raise TypeError(
            f"features_{side} must be a dict name -> (N, D) tensor (e.g. from capture_features) "
            f"or a list of tensors, got {type(features).__name__}"
        )
    if not items:
        raise ValueError(f"features_{side} holds no layers")
    layers = {name: as_features(x, f"layer {name!r} of features_{side}") for name, x in items}
    n = {x.shape[0] for x in layers.values()}
    if len(n) > 1:
        sizes = ", ".join(f"{k}: {v.shape[0]}" for k, v in layers.items())
        raise ValueError(f"the layers of features_{side} have different numbers of samples ({sizes})")
    return layers


def alignment_matrix(
    features_a: Features, features_b: Features | None = None,
    metric: str | Callable[..., float] = "mutual_knn", *, null: int = 0, seed: int = 0, **kw: Any,
) -> AlignmentMatrix:
    """Compare every layer of ``features_a`` with every layer of ``features_b`` (module docstring).

    ``features_*``: dict layer name → ``(N, D)`` tensor (``capture_features``' output) or a list;
    ``features_b=None`` compares A with itself (symmetric metrics fill one triangle). ``metric``:
    a name or a metric function of this package (default ``"mutual_knn"``, platonic-rep's); ``kw``
    go to it (``k=10``, ``kernel="linear"``, …). ``null > 0`` adds a permutation null per cell
    (``null`` seeded row shuffles of B shared by all cells). Errors name the offending layer.

    Args:
        features_a: dict layer name → ``(N, D)`` features, or a list of them.
        features_b: the same for the second model; None: A against itself.
        metric: a built-in metric name or function (``"mutual_knn"``, ``"cka"``, …).
        null: row shuffles of B per cell for a permutation null (≥ 0; 0: none).
        seed: seed of the shuffles.
        **kw: keyword arguments of the metric.

    Returns:
        An :class:`AlignmentMatrix` (``(L_a, L_b)`` float64 on the CPU, with the null's mean and
        std per cell when ``null > 0``).

    Raises:
        TypeError: features that are not a dict or list of tensors, keyword arguments the
            metric does not take.
        ValueError: a metric that is not a built-in name or function (or a ``functools.partial``
            of one), no layers, layers with different N or devices, or what the metric raises
            for a layer (named).

    Example:
        >>> import torch
        >>> from neurothermo.alignment import alignment_matrix
        >>> _ = torch.manual_seed(0)
        >>> a = {"h1": torch.randn(50, 6), "h2": torch.randn(50, 4)}
        >>> Q, _ = torch.linalg.qr(torch.randn(6, 6))
        >>> m = alignment_matrix(a, {"g": a["h1"] @ Q}, "cka")
        >>> m.rows, m.cols, round(float(m.matrix[0, 0]), 6)  # h1 against a rotation of itself
        (('h1', 'h2'), ('g',), 1.0)
    """
    found = lookup(metric)
    if found is None:
        raise ValueError(
            f"alignment_matrix needs one of the built-in metrics ({', '.join(metric_names())}); "
            "for another function use permutation_null or loop over the layers"
        )
    check_int("null", null, minimum=0)
    name, cls = found
    m = build(cls, name, kw)
    la = _as_layers(features_a, "a")
    same = features_b is None or features_b is features_a
    lb = la if same else _as_layers(features_b, "b")  # type: ignore[arg-type]
    na, nb = next(iter(la.values())), next(iter(lb.values()))
    if na.shape[0] != nb.shape[0]:
        raise ValueError(
            f"features_a has N={na.shape[0]} samples per layer but features_b has N={nb.shape[0]}; "
            "both models must see the same samples in the same order"
        )
    devices = {x.device for x in (*la.values(), *lb.values())}
    if len(devices) > 1:
        raise ValueError(f"the layers live on several devices ({devices}); move them to one")
    with torch.no_grad():
        sa = {k: m.prepare(x, f"layer {k!r} of features_a") for k, x in la.items()}
        sb = sa if same else {k: m.prepare(x, f"layer {k!r} of features_b") for k, x in lb.items()}
        ka, kb = list(sa), list(sb)
        out = torch.empty(len(ka), len(kb), dtype=torch.float64)
        cells = [(i, j) for i in range(len(ka)) for j in range(len(kb))
                 if not (same and m.symmetric and j < i)]
        vals = torch.stack([m.compare(sa[ka[i]], sb[kb[j]]) for i, j in cells]).cpu()
        for (i, j), v in zip(cells, vals):
            out[i, j] = v
            if same and m.symmetric:
                out[j, i] = v
        mean = std = None
        if null:
            perms = permutations(na.shape[0], null, seed, na.device)
            draws = torch.empty(null, len(ka), len(kb), dtype=torch.float64)
            for t, p in enumerate(perms):
                pb = {k: m.permute(s, p) for k, s in sb.items()}
                draws[t] = torch.stack(
                    [torch.stack([m.compare(sa[a], pb[b]) for b in kb]) for a in ka]
                ).cpu()
            mean = draws.mean(dim=0)
            std = draws.std(dim=0) if null > 1 else torch.zeros_like(mean)
    return AlignmentMatrix(
        matrix=out, rows=tuple(ka), cols=tuple(kb), metric=name,
        higher_is_more_aligned=bool(m.higher_is_more_aligned), params=dict(kw),
        null_mean=mean, null_std=std, n_null=null,
    )
