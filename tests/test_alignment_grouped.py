from __future__ import annotations

import math

import pytest
import torch

from neurothermo import alignment as al
from neurothermo.alignment.grouped import group_mean_se, grouped_alignment, t_threshold


def _layers(seed: int, n: int = 60, data_seed: int | None = None) -> tuple[dict[str, torch.Tensor],
                                                                          dict[str, torch.Tensor]]:
    """Two "networks" (weights from ``seed``) applied to inputs from ``data_seed`` (default ``seed``)."""
    gx = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    x = torch.randn(n, 6, generator=gx, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    a = {"h0": x @ torch.randn(6, 5, generator=g, dtype=torch.float64),
         "h1": torch.tanh(x @ torch.randn(6, 7, generator=g, dtype=torch.float64))}
    b = {"g0": x @ torch.randn(6, 4, generator=g, dtype=torch.float64)
         + 0.5 * torch.randn(n, 4, generator=g, dtype=torch.float64)}
    return a, b


@pytest.mark.parametrize(("metric", "kw", "ref"), [
    ("cka", {}, lambda a, b: al.cka(a, b)),
    ("gram_alignment", {"method": "pearson_offdiag"},
     lambda a, b: al.gram_alignment(a, b, method="pearson_offdiag")),
    ("mutual_knn", {"k": 3}, lambda a, b: al.mutual_knn(a, b, k=3)),
])
def test_each_group_is_the_metric_on_its_samples(metric, kw, ref) -> None:
    a, b = _layers(0)
    groups = torch.arange(60) % 4
    g = grouped_alignment(a, b, metric, groups, **kw)
    assert g.per_group.shape == (4, 2, 1) and g.rows == ("h0", "h1") and g.cols == ("g0",)
    assert g.group_size == (15, 15, 15, 15)
    for s in range(4):
        idx = (groups == s).nonzero().squeeze(1)
        for i, name in enumerate(g.rows):
            assert float(g.per_group[s, i, 0]) == pytest.approx(ref(a[name][idx], b["g0"][idx]), abs=1e-12)
    vals = g.per_group[:, 1, 0]
    mean = sum(vals.tolist()) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals.tolist()) / 3)
    assert float(g.mean[1, 0]) == pytest.approx(mean, abs=1e-14)
    assert float(g.se[1, 0]) == pytest.approx(sd / 2, abs=1e-14)
    assert group_mean_se(vals) == pytest.approx((mean, sd / 2), abs=1e-14)
    d = g.to_dict()
    assert d["n_groups"] == 4 and len(d["se"]) == 2 and g.matrix().matrix.shape == (2, 1)


def test_within_network_maps_are_symmetric_with_unit_diagonal() -> None:
    a, _ = _layers(1)
    g = grouped_alignment(a, None, "cka", torch.arange(60) // 20)
    torch.testing.assert_close(g.per_group, g.per_group.transpose(1, 2))
    torch.testing.assert_close(torch.diagonal(g.per_group, dim1=1, dim2=2), torch.ones(3, 2, dtype=torch.float64))


def test_standard_error_matches_the_spread_over_fresh_data() -> None:
    # the same two "networks" on fresh inputs: the spread of the group mean over R independent data
    # sets must equal the average of the per-data-set estimates se = std/√S. The ratio is estimated
    # to relative precision ≈ 1/√(2(R−1)) ≈ 0.071 (R = 100); 3 of those = 0.21 is the tolerance.
    # (The se says nothing about other weights: a fresh seed per data set gives a ratio ≈ 3.)
    r, s, n = 100, 8, 20
    means, ses = [], []
    for rep in range(r):
        a, b = _layers(7, n=s * n, data_seed=100 + rep)
        g = grouped_alignment({"h1": a["h1"]}, b, "cka", torch.arange(s * n) % s)
        means.append(float(g.mean[0, 0]))
        ses.append(float(g.se[0, 0]))
    spread = float(torch.tensor(means).std())
    assert spread / (sum(ses) / r) == pytest.approx(1.0, abs=0.21)


def test_t_threshold_closed_forms() -> None:
    assert t_threshold(2, 0.25) == pytest.approx(1.0, rel=1e-12)  # 1 dof: Cauchy, tan(π/4)
    p = 0.99  # 2 dof: t_p = (2p − 1)/√(2p(1 − p))
    assert t_threshold(3, 0.01) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
    assert t_threshold(10**6, 0.01) == pytest.approx(2.3263479, rel=1e-5)  # → normal quantile
    with pytest.raises(ValueError, match="alpha must be in"):
        t_threshold(5, 0.7)


@pytest.mark.parametrize(("groups", "match"), [
    (torch.zeros(60, dtype=torch.long), "S >= 2"),
    (torch.arange(60) % 3 * 2, "each label used"),
    (torch.arange(59) % 2, r"shape \(60,\)"),
    (torch.arange(60).double() % 2, "integer tensor"),
    (torch.arange(60) % 2 - 1, "label every sample"),
])
def test_bad_groups_are_refused(groups, match) -> None:
    a, b = _layers(2)
    with pytest.raises(ValueError, match=match):
        grouped_alignment(a, b, "cka", groups)


def test_a_group_too_small_for_the_metric_is_named() -> None:
    a, b = _layers(3)
    groups = torch.cat([torch.zeros(56, dtype=torch.long), torch.ones(4, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"group 1 \(4 samples\): k=5 is too large"):
        grouped_alignment(a, b, "mutual_knn", groups, k=5)
    with pytest.raises(ValueError, match="at least two group values"):
        group_mean_se(torch.ones(1))
