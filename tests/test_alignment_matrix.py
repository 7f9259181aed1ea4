"""Layer × layer maps and the permutation null: reuse of per-layer statistics, labels, errors."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from neurothermo import alignment as al
from neurothermo.alignment._spec import _BY_NAME, build

CONFIGS = [
    ("mutual_knn", {"k": 5}),
    ("cycle_knn", {"k": 5}),
    ("cknna", {"k": 6}),
    ("cknna", {"k": 6, "unbiased": False}),
    ("cka", {}),
    ("cka", {"unbiased": True}),
    ("cka", {"kernel": "rbf"}),
    ("cka", {"kernel": "rbf", "unbiased": True}),
    ("svcca", {}),
    ("procrustes_distance", {}),
    ("gram_alignment", {}),
    ("gram_alignment", {"method": "pearson_offdiag"}),
]


def _layers(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g, dtype=torch.float64)
    a = {f"a{i}": torch.tanh(base @ torch.randn(6, 8 + i, generator=g, dtype=torch.float64))
         for i in range(3)}
    b = {f"b{j}": base @ torch.randn(6, 5 + j, generator=g, dtype=torch.float64)
         + 0.3 * torch.randn(n, 5 + j, generator=g, dtype=torch.float64) for j in range(2)}
    return a, b


@pytest.mark.parametrize(("name", "kw"), CONFIGS)
def test_permuted_statistics_equal_recomputed_ones(name, kw):
    """``permute(prepare(x), π)`` must score exactly like ``prepare(x[π])``."""
    a, b = _layers()
    m = build(_BY_NAME[name][1], name, kw)
    x, y = a["a1"], b["b1"]
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    sx = m.prepare(x, "x")
    fast = m.compare(sx, m.permute(m.prepare(y, "y"), perm))
    slow = m.compare(sx, m.prepare(y[perm], "y"))
    assert float(fast) == pytest.approx(float(slow), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(("name", "kw"), CONFIGS)
def test_matrix_cells_equal_pairwise_calls(name, kw):
    a, b = _layers()
    fn = _BY_NAME[name][0]
    res = al.alignment_matrix(a, b, name, **kw)
    assert res.matrix.shape == (3, 2)
    assert res.rows == ("a0", "a1", "a2") and res.cols == ("b0", "b1")
    for i, ra in enumerate(res.rows):
        for j, cb in enumerate(res.cols):
            assert float(res.matrix[i, j]) == pytest.approx(fn(a[ra], b[cb], **kw), rel=1e-12, abs=1e-14)
    assert res.max == pytest.approx(float(res.matrix.max()))
    assert res.value(*res.argmax) == res.max
    assert res.best == (res.max if res.higher_is_more_aligned else float(res.matrix.min()))
    assert res.value(*res.best_pair) == res.best
    assert torch.equal(res.diagonal, torch.stack([res.matrix[0, 0], res.matrix[1, 1]]))


def test_each_layer_is_prepared_once(monkeypatch):
    from neurothermo.alignment.knn import MutualKnn

    calls: list[str] = []
    original = MutualKnn.prepare

    def spy(self, x, name):
        calls.append(name)
        return original(self, x, name)

    monkeypatch.setattr(MutualKnn, "prepare", spy)
    a, b = _layers()
    al.alignment_matrix(a, b, al.mutual_knn, k=5, null=4)
    assert len(calls) == 5  # L_a + L_b, not 2·L_a·L_b (nor more for the null)
    calls.clear()
    al.alignment_matrix(a, None, "mutual_knn", k=5)
    assert len(calls) == 3


def test_self_map_is_symmetric_with_unit_diagonal():
    a, _ = _layers()
    res = al.alignment_matrix(a, None, "cka")
    assert torch.allclose(res.matrix, res.matrix.T)
    assert torch.allclose(res.diagonal, torch.ones(3, dtype=torch.float64))
    asym = al.alignment_matrix(a, None, "cycle_knn", k=4)  # not symmetric: every cell computed
    assert float(asym.matrix[0, 1]) == pytest.approx(al.cycle_knn(a["a0"], a["a1"], 4))
    assert float(asym.matrix[1, 0]) == pytest.approx(al.cycle_knn(a["a1"], a["a0"], 4))


def test_list_inputs_and_to_dict():
    a, b = _layers()
    res = al.alignment_matrix(list(a.values()), list(b.values()), "cka")
    assert res.rows == ("0", "1", "2")
    d = res.to_dict()
    assert d["max"] == res.max and len(d["matrix"]) == 3 and d["metric"] == "cka"


def test_matrix_null_matches_permutation_null():
    a, b = _layers()
    res = al.alignment_matrix(a, b, "mutual_knn", k=5, null=30, seed=7)
    one = al.permutation_null("mutual_knn", a["a2"], b["b0"], n=30, seed=7, k=5)
    assert float(res.null_mean[2, 0]) == pytest.approx(one.null_mean, rel=1e-12)
    assert float(res.null_std[2, 0]) == pytest.approx(one.null_std, rel=1e-12)
    assert float(res.z[2, 0]) == pytest.approx(one.z, rel=1e-12)
    assert res.to_dict()["n_null"] == 30


def test_layer_errors_name_the_layer():
    a, b = _layers()
    bad = dict(b)
    bad["b1"] = b["b1"].clone()
    bad["b1"][4, 2] = math.nan
    with pytest.raises(ValueError, match=r"layer 'b1' of features_b contains NaN or Inf"):
        al.alignment_matrix(a, bad, "cka")
    const = dict(a)
    const["a0"] = torch.ones(60, 4)
    with pytest.raises(ValueError, match=r"layer 'a0' of features_a is constant"):
        al.alignment_matrix(const, b, "cka")
    short = dict(a)
    short["a2"] = a["a2"][:50]
    with pytest.raises(ValueError, match=r"different numbers of samples \(a0: 60, a1: 60, a2: 50\)"):
        al.alignment_matrix(short, b, "cka")
    with pytest.raises(ValueError, match="features_a has N=60 samples per layer but features_b has N=50"):
        al.alignment_matrix(a, {k: v[:50] for k, v in b.items()}, "cka")
    with pytest.raises(ValueError, match=r"k=60 is too large for layer 'a0' of features_a"):
        al.alignment_matrix(a, b, "mutual_knn", k=60)
    with pytest.raises(ValueError, match="unknown metric 'ckaa'"):
        al.alignment_matrix(a, b, "ckaa")
    with pytest.raises(ValueError, match="built-in metrics"):
        al.alignment_matrix(a, b, lambda x, y: 0.0)
    with pytest.raises(TypeError, match="metric 'cka'"):
        al.alignment_matrix(a, b, "cka", k=3)
    with pytest.raises(ValueError, match="no layers"):
        al.alignment_matrix({}, b, "cka")


# --------------------------------------------------------------------------- permutation null


def test_fast_null_equals_plain_callable_null():
    a, b = _layers()
    x, y = a["a0"], b["b0"]
    fast = al.permutation_null(al.cka, x, y, n=20, seed=2, unbiased=True)
    slow = al.permutation_null(lambda p, q: al.cka(p, q, unbiased=True), x, y, n=20, seed=2)
    assert fast.score == pytest.approx(slow.score, rel=1e-12)
    assert fast.null == pytest.approx(slow.null, rel=1e-10, abs=1e-14)
    assert fast.metric == "cka" and slow.metric == "<lambda>"


def test_null_statistics_and_p_value():
    a, _ = _layers()
    x = a["a1"]
    res = al.permutation_null("cka", x, x @ torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))[0], n=19)
    assert res.score == pytest.approx(1.0)
    assert res.p_value == pytest.approx(1 / 20)  # no shuffle reaches the paired score
    assert res.z > 5 and res.excess > 0
    null = torch.tensor(res.null, dtype=torch.float64)
    assert res.null_mean == pytest.approx(float(null.mean()))
    assert res.null_std == pytest.approx(float(null.std()))
    assert res.z == pytest.approx((res.score - res.null_mean) / res.null_std)
    # a distance: the lower tail counts
    dist = al.permutation_null(al.procrustes_distance, x, x * 2.0, n=19)
    assert not dist.higher_is_more_aligned
    assert dist.p_value == pytest.approx(1 / 20) and dist.excess > 0 and dist.z < 0


def test_null_without_spread_gives_infinite_or_zero_z():
    x = torch.randn(12, 3, dtype=torch.float64)
    res = al.permutation_null(lambda p, q: 1.0, x, x, n=5)
    assert res.z == 0.0 and res.null_std == 0.0 and res.p_value == 1.0
    res = al.permutation_null(lambda p, q: float(torch.equal(p, q)), x, x, n=5)
    assert res.z == math.inf


def test_null_bad_input():
    x = torch.randn(20, 3)
    with pytest.raises(ValueError, match="n must be >= 2"):
        al.permutation_null("cka", x, x, n=1)
    with pytest.raises(ValueError, match="N=20 samples but B has N=19"):
        al.permutation_null("cka", x, x[:19])
    with pytest.raises(FloatingPointError, match="non-finite"):
        al.permutation_null(lambda p, q: math.nan, x, x, n=3)
    with pytest.raises(ValueError, match="functools.partial"):
        al.permutation_null(functools.partial(al.cka, unbiased=True), x, x)
