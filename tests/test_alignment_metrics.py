"""Alignment metrics against plain reference formulas, their invariances, and bad input."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

from neurothermo import alignment as al
from neurothermo.alignment.knn import knn_indices

# --------------------------------------------------------------------------- references (plain, dense)


def ref_knn(x: torch.Tensor, k: int, *, normalize: bool = True, exclude_self: bool = True) -> torch.Tensor:
    """Full stable sort of the dense similarity matrix (ties → lower index), platonic-rep style."""
    x = x.double()
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    s = x @ x.T
    if exclude_self:
        s.fill_diagonal_(-math.inf)
    return torch.sort(-s, dim=1, stable=True).indices[:, :k]


def ref_mutual(a, b, k, **kw):
    n = a.shape[0]
    ka, kb = ref_knn(a, k, **kw), ref_knn(b, k, **kw)
    ma, mb = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n).unsqueeze(1)
    ma[rows, ka] = 1.0
    mb[rows, kb] = 1.0
    return float(((ma * mb).sum(dim=1) / k).mean())


def ref_cycle(a, b, k):
    n = a.shape[0]
    ka, kb = ref_knn(a, k), ref_knn(b, k)
    hit = ka[kb] == torch.arange(n).view(-1, 1, 1)
    return float(hit.double().view(n, -1).max(dim=1).values.mean())


def hsic_biased(k, lm):
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    return torch.trace(k @ h @ lm @ h)


def hsic_unbiased(k, lm):
    n = k.shape[0]
    kt, lt = k.clone().fill_diagonal_(0), lm.clone().fill_diagonal_(0)
    v = (kt * lt.T).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 * (kt @ lt).sum() / (n - 2)
    return v / (n * (n - 3))


def ref_cka_from_kernels(k, lm, unbiased=False):
    h = hsic_unbiased if unbiased else hsic_biased
    return float(h(k, lm) / torch.sqrt(h(k, k) * h(lm, lm)))


def ref_rbf(x, sigma=None):
    x = x.double()
    d2 = torch.cdist(x, x) ** 2
    if sigma is None:
        iu = torch.triu_indices(len(x), len(x), 1)
        s2 = d2[iu[0], iu[1]].median()
    else:
        s2 = sigma**2
    return torch.exp(-d2 / (2 * s2))


def ref_cknna(a, b, k, unbiased=True):
    n = a.shape[0]
    a = a.double() / a.double().norm(dim=1, keepdim=True)
    b = b.double() / b.double().norm(dim=1, keepdim=True)

    def sim(k1, l1):
        m1 = torch.zeros(n, n, dtype=torch.float64).scatter_(
            1, ref_knn(k1, k, normalize=False, exclude_self=unbiased), 1.0)
        m2 = torch.zeros(n, n, dtype=torch.float64).scatter_(
            1, ref_knn(l1, k, normalize=False, exclude_self=unbiased), 1.0)
        mask = m1 * m2
        h = hsic_unbiased if unbiased else hsic_biased
        return h(mask * (k1 @ k1.T), mask * (l1 @ l1.T))

    return float(sim(a, b) / torch.sqrt(sim(a, a) * sim(b, b)))


def ref_cca_mean(a, b, ridge_a=0.0, ridge_b=0.0, count=None):
    """Classic (ridge) CCA from covariance matrices: ρ² = eig((C_aa+λ)⁻¹ C_ab (C_bb+λ)⁻¹ C_ba).

    Mean of the ``count`` largest canonical correlations (default min(D_a, D_b)).
    """
    a = (a - a.mean(0)).double()
    b = (b - b.mean(0)).double()
    caa, cbb, cab = a.T @ a, b.T @ b, a.T @ b
    caa = caa + ridge_a * torch.eye(len(caa), dtype=caa.dtype)
    cbb = cbb + ridge_b * torch.eye(len(cbb), dtype=cbb.dtype)
    m = torch.linalg.solve(caa, cab) @ torch.linalg.solve(cbb, cab.T)
    count = count or min(a.shape[1], b.shape[1])
    rho2 = torch.linalg.eigvals(m).real.sort(descending=True).values[:count]
    return float(rho2.clamp(0, 1).sqrt().mean())


# --------------------------------------------------------------------------- data


def _data(n=80, d=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, d + 3, generator=g, dtype=dtype)
    b = torch.tanh(a @ w) + 0.5 * torch.randn(n, d + 3, generator=g, dtype=dtype)
    return a, b


def _rotation(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


METRICS = {
    # name: (function, kwargs, invariant to translation?, maximum / best value)
    "mutual_knn": (al.mutual_knn, {"k": 5}, False, 1.0),
    "cycle_knn": (al.cycle_knn, {"k": 5}, False, 1.0),
    "cknna": (al.cknna, {"k": 8}, False, 1.0),
    "cka_linear": (al.cka, {}, True, 1.0),
    "cka_linear_unbiased": (al.cka, {"unbiased": True}, True, 1.0),
    "cka_rbf": (al.cka, {"kernel": "rbf"}, True, 1.0),
    "cka_rbf_unbiased": (al.cka, {"kernel": "rbf", "unbiased": True}, True, 1.0),
    "svcca": (al.svcca, {}, True, 1.0),
    "procrustes": (al.procrustes_distance, {}, True, 0.0),
    "procrustes_euclidean": (al.procrustes_distance, {"form": "euclidean"}, True, 0.0),
    "gram_cosine": (al.gram_alignment, {}, False, 1.0),
    "gram_pearson": (al.gram_alignment, {"method": "pearson_offdiag"}, False, 1.0),
}
# cycle k-NN, and CKNNA's unbiased HSIC (its 1ᵀK̃L̃1 term with non-symmetric masked kernels, as in
# platonic-rep), are not symmetric.
SYMMETRIC = [m for m in METRICS if m not in ("cycle_knn", "cknna")]



# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("k", [1, 5, 79])
def test_knn_matches_full_stable_sort(k):
    a, _ = _data()
    got = knn_indices(torch.nn.functional.normalize(a, dim=1), k)
    want = ref_knn(a, k).sort(dim=1).values
    assert torch.equal(got, want)


def test_mutual_and_cycle_knn_match_reference():
    a, b = _data(n=90)
    for k in (1, 4, 10):
        assert al.mutual_knn(a, b, k) == pytest.approx(ref_mutual(a, b, k), abs=1e-12)
        assert al.cycle_knn(a, b, k) == pytest.approx(ref_cycle(a, b, k), abs=1e-12)
    assert al.mutual_knn(a, b, 6, normalize=False) == pytest.approx(
        ref_mutual(a, b, 6, normalize=False), abs=1e-12)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cknna_matches_dense_reference(unbiased):
    a, b = _data(n=70)
    for k in (2, 7, 20):
        assert al.cknna(a, b, k, unbiased=unbiased) == pytest.approx(
            ref_cknna(a, b, k, unbiased), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("shape", [(60, 7, 9), (15, 40, 33)])  # N > D and N < D (compressed path)
def test_linear_cka_matches_explicit_centring(unbiased, shape):
    n, da, db = shape
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, da, generator=g, dtype=torch.float64) + 2.0
    b = a[:, :1] * torch.randn(1, db, generator=g, dtype=torch.float64) + torch.randn(n, db, generator=g, dtype=torch.float64)
    want = ref_cka_from_kernels(a @ a.T, b @ b.T, unbiased)
    assert al.cka(a, b, unbiased=unbiased) == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_rbf_cka_matches_explicit(unbiased):
    a, b = _data(n=50)
    for sigma in (None, 2.5):
        want = ref_cka_from_kernels(ref_rbf(a, sigma), ref_rbf(b, sigma), unbiased)
        assert al.cka(a, b, "rbf", unbiased=unbiased, sigma=sigma) == pytest.approx(want, rel=1e-10)


def test_float32_cka_close_to_float64():
    a, b = _data(n=300, d=40)
    # sums are accumulated in float64; only the float32 rounding of the inputs (~6e-8) remains
    assert al.cka(a.float(), b.float()) == pytest.approx(al.cka(a, b), abs=1e-6)


def test_svcca_all_directions_equals_classic_cca():
    a, b = _data(n=200, d=6)  # D_a = 6, D_b = 9
    assert al.svcca(a, b, variance=1.0) == pytest.approx(ref_cca_mean(a, b), rel=1e-9)
    assert al.svcca(a, b[:, :6], dims=6) == pytest.approx(ref_cca_mean(a, b[:, :6]), rel=1e-9)


def test_svcca_variance_rule_keeps_the_top_directions():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(100, 5, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(z - z.mean(0))  # centred orthonormal columns
    s = torch.tensor([50.0, 40.0, 9.5, 0.3, 0.2], dtype=torch.float64).sqrt()  # 99% at 3 directions
    a = u * s
    b = torch.randn(100, 3, generator=g, dtype=torch.float64) + a[:, :1]
    assert al.svcca(a, b) == pytest.approx(al.svcca(a[:, :3], b), rel=1e-12)
    assert al.svcca(a, b) != pytest.approx(al.svcca(a, b, variance=1.0), rel=1e-6)


def test_svcca_ridge_matches_regularised_cca():
    a, b = _data(n=100, d=5)
    ridge = 0.3
    sa = torch.linalg.svdvals(a - a.mean(0)) ** 2
    sb = torch.linalg.svdvals(b - b.mean(0)) ** 2
    want = ref_cca_mean(a, b, ridge * float(sa.mean()), ridge * float(sb.mean()))
    got = al.svcca(a, b, ridge=ridge, variance=1.0)  # every direction kept, as in the reference
    assert got == pytest.approx(want, rel=1e-9)
    assert got < al.svcca(a, b, variance=1.0)  # shrinkage lowers every canonical correlation


def test_procrustes_matches_scipy():
    a, b = _data(n=70, d=8)
    b = b[:, :8]

    def prep(x):
        x = (x - x.mean(0)).numpy()
        return x / np.linalg.norm(x)

    pa, pb = prep(a), prep(b)
    r, _ = orthogonal_procrustes(pb, pa)
    euclid = np.linalg.norm(pb @ r - pa)
    assert al.procrustes_distance(a, b, form="euclidean") == pytest.approx(euclid, rel=1e-9)
    assert al.procrustes_distance(a, b) == pytest.approx(math.acos(1 - euclid**2 / 2), rel=1e-9)


def test_gram_alignment_matches_dense():
    a, b = _data(n=40)
    a = a + 0.3
    k, lm = a @ a.T, b @ b.T
    cos = float((k * lm).sum() / (k.norm() * lm.norm()))
    off = ~torch.eye(40, dtype=torch.bool)
    pearson = float(np.corrcoef(k[off].numpy(), lm[off].numpy())[0, 1])
    assert al.gram_alignment(a, b) == pytest.approx(cos, rel=1e-10)
    assert al.gram_alignment(a, b, "pearson_offdiag") == pytest.approx(pearson, rel=1e-9)
    # compressed path (D > N) gives the same numbers
    wide = torch.cat([a, torch.zeros(40, 50, dtype=a.dtype)], 1) @ _rotation(62)
    assert al.gram_alignment(wide, b, "pearson_offdiag") == pytest.approx(pearson, rel=1e-9)


def test_pearson_offdiag_can_be_negative():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 3, generator=g, dtype=torch.float64)
    k = a @ a.T
    # L = 11ᵀ − K + λI is PSD for λ ≥ λ_max(K), and its off-diagonal entries are 1 − K_ij
    eye = torch.eye(30, dtype=torch.float64)
    lm = torch.ones(30, 30, dtype=torch.float64) - k + (torch.linalg.eigvalsh(k).max() + 1) * eye
    w, v = torch.linalg.eigh(lm)
    assert w.min() > 0
    b = v * w.sqrt()
    assert al.gram_alignment(a, b, "pearson_offdiag") == pytest.approx(-1.0, abs=1e-9)


# --------------------------------------------------------------------------- invariances


def _transforms(d):
    g = torch.Generator().manual_seed(7)
    shift = 3.0 * torch.randn(1, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(d, generator=g)
    return {
        "rotation": lambda x: x @ _rotation(d),
        "scale": lambda x: 3.7 * x,
        "columns": lambda x: x[:, perm],
        "translation": lambda x: x + shift,
    }


@pytest.mark.parametrize("name", sorted(METRICS))
def test_invariances(name):
    fn, kw, translation_invariant, _ = METRICS[name]
    a, b = _data(n=80)
    base = fn(a, b, **kw)
    tol = 1e-9  # float64 roundoff; the Procrustes angle is well-conditioned away from 0
    for tname, t in _transforms(a.shape[1]).items():
        moved = fn(t(a), b, **kw)
        if tname == "translation" and not translation_invariant:
            assert abs(moved - base) > 1e-3, f"{name} should change under {tname}"
        else:
            assert moved == pytest.approx(base, abs=tol), f"{name} not invariant to {tname}"


@pytest.mark.parametrize("name", ["cka_linear", "procrustes", "gram_cosine", "mutual_knn"])
def test_not_invariant_to_anisotropic_scaling(name):
    fn, kw, _, _ = METRICS[name]
    a, b = _data(n=80)
    stretch = torch.logspace(-1, 1, a.shape[1], dtype=torch.float64)
    assert abs(fn(a * stretch, b, **kw) - fn(a, b, **kw)) > 1e-3


def test_svcca_invariant_to_invertible_maps():
    a, b = _data(n=150, d=6)
    g = torch.Generator().manual_seed(2)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6, dtype=torch.float64)
    assert al.svcca(a @ m, b, dims=6) == pytest.approx(al.svcca(a, b, dims=6), abs=1e-9)


def test_clipping_and_standardize_break_rotation_invariance():
    a, b = _data(n=80)
    q = _rotation(a.shape[1])
    assert abs(al.cka(a @ q, b, clip_quantile=0.8) - al.cka(a, b, clip_quantile=0.8)) > 1e-4
    assert abs(al.svcca(a @ q, b, dims=5, standardize=True) - al.svcca(a, b, dims=5, standardize=True)) > 1e-4


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric(name):
    fn, kw, _, _ = METRICS[name]
    a, b = _data(n=70)
    assert fn(a, b, **kw) == pytest.approx(fn(b, a, **kw), abs=1e-12)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_identical_inputs_give_the_maximum(name):
    fn, kw, _, best = METRICS[name]
    a, _ = _data(n=70)
    # float64; the Procrustes angle is arccos(ν) at ν = 1, which turns roundoff δ ≈ 1e-15 in ν
    # into √(2δ) ≈ 5e-8 in the angle (and the Euclidean form likewise), hence 1e-6 there
    tol = 1e-6 if name.startswith("procrustes") else 1e-9
    assert fn(a, a.clone(), **kw) == pytest.approx(best, abs=tol)


def test_cycle_knn_and_unbiased_cknna_are_not_symmetric():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(60, 3, generator=g, dtype=torch.float64)
    b = torch.randn(60, 3, generator=g, dtype=torch.float64)
    assert al.cycle_knn(a, b, 3) == pytest.approx(ref_cycle(a, b, 3))
    assert al.cycle_knn(b, a, 3) == pytest.approx(ref_cycle(b, a, 3))
    assert al.cycle_knn(a, b, 3) != pytest.approx(al.cycle_knn(b, a, 3))
    assert al.cknna(a, b, 5) != pytest.approx(al.cknna(b, a, 5), rel=1e-6)
    # the biased CKNNA, tr(K̃HL̃H), is symmetric
    assert al.cknna(a, b, 5, unbiased=False) == pytest.approx(al.cknna(b, a, 5, unbiased=False), rel=1e-12)


# --------------------------------------------------------------------------- ties


def test_ties_break_toward_lower_index_whatever_the_block_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (50, 4), generator=g).double()  # integer dot products: exact ties
    want = ref_knn(x, 6, normalize=False).sort(dim=1).values
    for rows in (1, 7, 50):
        assert torch.equal(knn_indices(x, 6, block_rows=rows), want)
    same = torch.ones(9, 3)
    got = knn_indices(same, 3)
    assert torch.equal(got[0], torch.tensor([1, 2, 3]))
    assert torch.equal(got[5], torch.tensor([0, 1, 2]))
    # and the metrics built on it are deterministic across repeated calls
    y = torch.randint(0, 3, (50, 4), generator=g).double()
    vals = {al.mutual_knn(x, y, 6, normalize=False) for _ in range(3)}
    assert len(vals) == 1
    assert vals.pop() == pytest.approx(ref_mutual(x, y, 6, normalize=False), abs=1e-12)


# --------------------------------------------------------------------------- null level


@pytest.mark.parametrize("name", sorted(METRICS))
def test_independent_features_sit_at_the_null(name):
    fn, kw, _, _ = METRICS[name]
    g = torch.Generator().manual_seed(11)
    a = torch.randn(120, 10, generator=g, dtype=torch.float64)
    b = torch.randn(120, 14, generator=g, dtype=torch.float64)
    res = al.permutation_null(fn, a, b, n=60, seed=1, **kw)
    # independent data are exchangeable with their shuffles: the score is one more draw from the
    # null, so it lies within 4 null standard deviations (probability ≥ 15/16 by Chebyshev for any
    # distribution, ≈ 0.9999 for a near-normal one; fixed seeds).
    assert abs(res.score - res.null_mean) <= 4 * res.null_std


def test_null_means_match_closed_forms():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(200, 8, generator=g, dtype=torch.float64)
    b = torch.randn(200, 8, generator=g, dtype=torch.float64)
    n = 200
    # E_π[mutual kNN] = k/(N−1) exactly (a shuffled neighbour set is a uniform k-subset), and
    # E_π[unbiased CKA] = 0 exactly (U-centred kernels have zero row sums). The mean of n draws is
    # within 4 standard errors std/√n of it.
    res = al.permutation_null("mutual_knn", a, b, n=n, k=10)
    assert abs(res.null_mean - 10 / 199) <= 4 * res.null_std / math.sqrt(n)
    res = al.permutation_null("cka", a, b, n=n, unbiased=True)
    assert abs(res.null_mean) <= 4 * res.null_std / math.sqrt(n)


# --------------------------------------------------------------------------- bad input


def test_unbiased_needs_four_samples():
    a = torch.randn(3, 5)
    with pytest.raises(ValueError, match="N >= 4"):
        al.cka(a, a, unbiased=True)
    with pytest.raises(ValueError, match="N >= 4"):
        al.cka(a, a, "rbf", unbiased=True)
    with pytest.raises(ValueError, match="N >= 4"):
        al.cknna(a, a, k=2)
    assert 0.0 <= al.cka(a, a * 2) <= 1.0 + 1e-12  # biased CKA is defined for N = 3


@pytest.mark.parametrize("fn", [al.mutual_knn, al.cycle_knn, al.cknna])
def test_k_at_least_n_is_rejected(fn):
    a = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"k=10 is too large .* at most"):
        fn(a, a, k=10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        al.mutual_knn(a, a, k=0)
    assert fn(a, a, k=9) == pytest.approx(1.0)  # k = N − 1: every other sample is a neighbour


@pytest.mark.parametrize("name", sorted(METRICS))
def test_mismatched_n_is_rejected(name):
    fn, kw, _, _ = METRICS[name]
    with pytest.raises(ValueError, match="N=30 samples but B has N=31"):
        fn(torch.randn(30, 4), torch.randn(31, 4), **kw)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", sorted(METRICS))
def test_non_finite_features_are_rejected(name, bad):
    fn, kw, _, _ = METRICS[name]
    a = torch.randn(30, 4)
    b = a.clone()
    b[3, 1] = bad
    with pytest.raises(ValueError, match="B contains NaN or Inf"):
        fn(a, b, **kw)


@pytest.mark.parametrize("name", ["cka_linear", "cka_linear_unbiased", "cka_rbf", "svcca",
                                  "procrustes", "gram_pearson", "mutual_knn", "cycle_knn",
                                  "cknna"])
def test_constant_features_raise(name):
    # Degenerate inputs are treated alike by every metric whose value they would make meaningless:
    # for the k-NN metrics all similarities tie, so the "neighbours" would be decided by index.
    fn, kw, _, _ = METRICS[name]
    a = torch.randn(30, 4)
    const = torch.full((30, 4), 0.1)  # 0.1 is inexact in float32: rounding must not pass as signal
    for x, y in ((a, const), (const, a), (const, const)):
        with pytest.raises(ValueError, match="constant|all equal|undefined"):
            fn(x, y, **kw)


def test_gram_cosine_of_constant_features_is_defined():
    # The uncentred Gram cosine is defined for constant (non-zero) features; all zeros are not.
    fn, kw, _, _ = METRICS["gram_cosine"]
    a = torch.randn(30, 4)
    assert math.isfinite(fn(a, torch.full((30, 4), 0.1), **kw))
    with pytest.raises(ValueError, match="all zeros"):
        fn(a, torch.zeros(30, 4))


def test_cca_with_fewer_samples_than_features_warns_and_regularises():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 50, generator=g, dtype=torch.float64)
    b = torch.randn(20, 60, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = al.svcca(a, b, ridge=0.0)  # explicit ridge: no warning
    assert plain == pytest.approx(1.0, abs=1e-6)  # the N < D pathology: every correlation is 1
    with pytest.warns(al.AlignmentWarning, match=r"fewer samples than features \(N=20 < D=[56]0\)"):
        reg = al.svcca(a, b)
    assert math.isfinite(reg) and reg < 0.99
    assert reg == pytest.approx(al.svcca(a, b, ridge=0.1), abs=1e-12)
    # the regularised value is ridge CCA on the 19 = N − 1 directions each layer has
    full = al.svcca(a, b, ridge=0.1, variance=1.0)
    sa = torch.linalg.svdvals(a - a.mean(0))[:19] ** 2
    sb = torch.linalg.svdvals(b - b.mean(0))[:19] ** 2
    want = ref_cca_mean(a, b, 0.1 * float(sa.mean()), 0.1 * float(sb.mean()), count=19)
    assert full == pytest.approx(want, rel=1e-6)


def test_argument_errors():
    a = torch.randn(20, 4)
    with pytest.raises(ValueError, match="2-D"):
        al.cka(torch.randn(20), a)
    with pytest.raises(ValueError, match="kernel must be"):
        al.cka(a, a, kernel="poly")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        al.cka(a, a, kernel="rbf", sigma=0.0)
    with pytest.raises(ValueError, match="method must be"):
        al.gram_alignment(a, a, method="spearman")
    with pytest.raises(ValueError, match="form must be"):
        al.procrustes_distance(a, a, form="cosine")
    with pytest.raises(ValueError, match="dims=9 but A has only 4"):
        al.svcca(a, a, dims=9)
    with pytest.raises(ValueError, match="clip_quantile"):
        al.cka(a, a, clip_quantile=1.5)
    with pytest.raises(ValueError, match="k >= 2"):
        al.cknna(a, a, k=1)


def test_huge_finite_features_are_accepted():
    a, b = _data(n=40)
    pos = a.abs()
    big = (pos / pos.max() * 3e38).float()  # finite, but its sum overflows float32
    assert not math.isfinite(float(big.sum()))  # so the fast finite check must fall back
    assert al.cka(big, b) == pytest.approx(al.cka(pos, b), rel=1e-6)  # scale invariance
