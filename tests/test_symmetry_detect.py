"""find_symmetries / verify_symmetry: detection counts and kinds per model, fakes, errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import neurothermo as nt
from neurothermo.symmetry import Symmetry, UntraceableModelError, find_symmetries, verify_symmetry
from neurothermo.symmetry.base import ParamSlice

D = torch.float64


def _seq_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


class Functional(nn.Module):
    """A custom forward with F.relu, torch.tanh, x @ W + b, F.leaky_relu and a per-channel PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.d, self.e = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(4, 3), nn.Linear(3, 2)
        self.W = nn.Parameter(torch.randn(6, 4) / 3)
        self.c = nn.Parameter(torch.randn(4))
        self.prelu = nn.PReLU(3, init=0.2)

    def forward(self, x):
        h = torch.tanh(self.b(F.relu(self.a(x))))
        h = F.leaky_relu(h @ self.W + self.c, 0.1)
        return self.e(self.prelu(self.d(h)))


class CNN(nn.Module):
    def __init__(self, eps: float = 1e-13) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=eps), nn.Conv2d(4, 5, 3)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.flatten(self.pool(F.relu(self.c2(h))), 1))


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc1, self.fc2, self.out = nn.Linear(5, 6), nn.Linear(6, 9), nn.Linear(9, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.out(h)


class HandAttention(nn.Module):
    """Pre-LN transformer block with separate q/k/v/o Linear layers and a ReLU MLP."""

    def __init__(self, d: int = 8, heads: int = 2, sdpa: bool = False) -> None:
        super().__init__()
        self.h, self.sdpa = heads, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2, self.head = nn.Linear(d, 16), nn.Linear(16, d), nn.Linear(d, 3)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)

        def split(z):
            return z.view(b, t, self.h, d // self.h).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.h)
            y = att.softmax(-1) @ v
        x = x + self.o(y.transpose(1, 2).contiguous().view(b, t, d))
        x = x + self.fc2(F.relu(self.fc1(self.ln2(x))))
        return self.head(x)


class MHABlock(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln, self.attn, self.head = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True), nn.Linear(d, 3)

    def forward(self, x):
        h = self.ln(x)
        return self.head(x + self.attn(h, h, h, need_weights=False)[0])


class CrossAttention(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kw)

    def forward(self, x, memory):
        return self.attn(x, memory, memory)[0]


@pytest.mark.parametrize("kw", [
    {}, {"kdim": 5, "vdim": 5}, {"add_bias_kv": True}, {"bias": False},
    {"add_zero_attn": True, "add_bias_kv": True, "kdim": 5, "vdim": 5},
])
def test_multihead_attention_variants(kw):
    torch.manual_seed(0)
    model = CrossAttention(**kw).to(D)
    inputs = (torch.randn(3, 4, 8, dtype=D), torch.randn(3, 6, kw.get("kdim", 8), dtype=D))
    report = find_symmetries(model, inputs, explain=True)
    assert [s.kind for s in report] == ["double_rotation"] * 2 and not report.rejected
    assert all(s.charge_shape == (2, 4, 4) for s in report)


class Abs(nn.Module):
    def forward(self, x):
        return torch.abs(x)


def _abs_mlp() -> nn.Module:
    """|x| is positively homogeneous (|a·x| = a·|x|, a > 0) but even, not odd: rescale, no sign flip."""
    return nn.Sequential(nn.Linear(4, 5), Abs(), nn.Linear(5, 2))


def _deep_linear() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 6, bias=False), nn.Linear(6, 3, bias=False))


def _weight_normed() -> nn.Module:
    return nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 2))


def _ln_mlp(eps: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5, eps=eps), nn.GELU(), nn.Linear(5, 2))


X2, X3, X4 = (5, 4), (3, 5, 8), (4, 3, 8, 8)
ZOO = {
    "sequential_mlp": (_seq_mlp, (7, 5), [
        ("rescale", "0", 8), ("permutation", "0", 8), ("sign_flip", "2", 6), ("permutation", "2", 6)]),
    "functional": (Functional, (7, 5), [
        ("rescale", "a", 7), ("permutation", "a", 7), ("sign_flip", "b", 6), ("permutation", "b", 6),
        ("rescale", "W", 4), ("permutation", "W", 4), ("rescale", "d", 3), ("permutation", "d", 3)]),
    "cnn": (CNN, X4, [
        ("scale", "c1", 4), ("permutation", "c1", 4), ("rescale", "bn", 4),
        ("rescale", "c2", 5), ("permutation", "c2", 5)]),
    "residual_mlp": (ResidualMLP, (5, 5), [("rescale", "fc1", 9), ("permutation", "fc1", 9)]),
    "hand_attention": (HandAttention, X3, [
        ("rescale", "ln1", 8), ("double_rotation", "q", 8), ("double_rotation", "v", 8),
        ("rescale", "ln2", 8), ("rescale", "fc1", 16), ("permutation", "fc1", 16)]),
    "sdpa_attention": (lambda: HandAttention(sdpa=True), X3, [
        ("rescale", "ln1", 8), ("double_rotation", "q", 8), ("double_rotation", "v", 8),
        ("rescale", "ln2", 8), ("rescale", "fc1", 16), ("permutation", "fc1", 16)]),
    "multihead_attention": (MHABlock, X3, [
        ("rescale", "ln", 8), ("double_rotation", "attn:", 8), ("double_rotation", "attn:", 8)]),
    "abs_mlp": (_abs_mlp, X2, [("rescale", "0", 5), ("permutation", "0", 5)]),
    "deep_linear": (_deep_linear, X2, [("double_rotation", "0", 5), ("double_rotation", "1", 6)]),
    "weight_norm": (_weight_normed, X2, [("rescale", "0", 5), ("permutation", "0", 5), ("scale", "0", 5)]),
    "layernorm_eps0": (_ln_mlp, X2, [("scale", "0", 1), ("permutation", "0", 5)]),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make, shape, _ = ZOO[name]
    return make().to(D), torch.randn(*shape, dtype=D)


def _summary(syms: list[Symmetry]) -> list[tuple[str, str, int]]:
    return sorted((s.kind, s.location.split()[0], s.n_units) for s in syms)


@pytest.mark.parametrize("name", list(ZOO))
def test_detection_counts_and_kinds(name):
    model, x = _build(name)
    report = find_symmetries(model, x, explain=True)
    assert _summary(list(report)) == sorted(ZOO[name][2])
    assert all(c <= 1e-10 for c in report.changes)


def test_attention_pairs_are_per_head():
    model, x = _build("hand_attention")
    by_loc = {s.location.split()[0]: s for s in find_symmetries(model, x) if s.kind == "double_rotation"}
    qk, vo = by_loc["q"], by_loc["v"]
    assert (qk.block, vo.block) == (4, 4) and qk.charge_shape == (2, 4, 4)
    w = dict(model.named_parameters())
    h0 = slice(0, 4)  # head 0: rows 0..3 of q/k/v, columns 0..3 of o
    wq = torch.cat([w["q.weight"][h0], w["q.bias"][h0, None]], 1)
    wk = torch.cat([w["k.weight"][h0], w["k.bias"][h0, None]], 1)
    ref_qk = wq @ wq.T - wk @ wk.T
    wv = torch.cat([w["v.weight"][h0], w["v.bias"][h0, None]], 1)
    ref_vo = wv @ wv.T - w["o.weight"][:, h0].T @ w["o.weight"][:, h0]
    torch.testing.assert_close(qk.charge(model)[0], ref_qk, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vo.charge(model)[0], ref_vo, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(ZOO))
def test_transforms_leave_outputs_unchanged(name):
    """Independent of verify_symmetry: forward before and after a random element, by hand."""
    model, x = _build(name)
    gen = torch.Generator().manual_seed(1)
    for sym in find_symmetries(model, x):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            ref = model(x)
            sym.transform(model, sym.random_element(gen))
            out = model(x)
        moved = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())
        assert moved > 1e-3, f"{sym}: the element did not move the parameters"
        assert float((out - ref).norm() / ref.norm()) <= 1e-12, str(sym)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n])


class TiedAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 4) / 2)

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.W)), self.W.t())


class ResidualAcrossHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.r1, self.r2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        u = F.relu(self.r1(x))
        return self.r2(u) + u


class FixedOffset(nn.Module):
    """Two linear maps with a fixed (buffer) offset between them: no double rotation."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(4, 5), nn.Linear(5, 2)
        self.register_buffer("c", torch.randn(5))

    def forward(self, x):
        return self.g(self.f(x) + self.c)


def _frozen_bias() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    m[0].bias.requires_grad_(False)
    return m


@pytest.mark.parametrize(("make", "absent", "reason"), [
    (ResidualAcrossHidden, {"rescale", "permutation"}, "residual add across the units"),
    (TiedAutoencoder, {"rescale", "permutation"}, "tied"),
    (FixedOffset, {"double_rotation", "rescale"}, "fixed tensor 'c'"),
    (_frozen_bias, {"double_rotation"}, "frozen"),
    (lambda: CNN().eval(), {"scale"}, "eval mode"),
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), weight_norm(nn.Linear(5, 2))),
     {"rescale"}, "weight-normalised: its columns cannot be scaled"),
])
def test_fake_patterns_are_left_out_and_explained(make, absent, reason):
    torch.manual_seed(0)
    model = make().to(D)
    x = torch.randn(*(X4 if isinstance(model, CNN) else X2), dtype=D)
    report = find_symmetries(model, x, explain=True)
    assert not absent & {s.kind for s in report}
    assert any(reason in r.reason for r in report.rejected), str(report)
    assert reason in str(report)


def test_fixed_offset_keeps_permutation_with_buffer():
    torch.manual_seed(0)
    model = FixedOffset().to(D)
    (perm,) = find_symmetries(model, torch.randn(5, 4, dtype=D))
    assert perm.kind == "permutation" and any(s.buffer and s.name == "c" for s in perm.slices)


def test_eps_breaking_is_reported_as_approximate_and_measured():
    torch.manual_seed(0)
    model, x = _ln_mlp(1e-5).to(D), torch.randn(*X2, dtype=D)
    report = find_symmetries(model, x, explain=True)
    (sc,) = [s for s in report if s.kind == "scale"]
    assert not sc.exact and "eps=1e-05 of '1'" in sc.broken_by and "approximate" in str(sc)
    assert 1e-10 < sc.breaking < 1e-3  # O(eps/σ²) in float64, not rounding and not O(1)
    assert report.approximate == (sc,)
    # control: the same net with eps = 0 has the exact symmetry
    exact = find_symmetries(_ln_mlp(0.0).to(D), x, explain=True)
    assert [s.exact for s in exact if s.kind == "scale"] == [True]
    # approx_tol=None restores the strict rule: rejected with the measured change and the cause
    strict = find_symmetries(model, x, explain=True, approx_tol=None)
    (rej,) = [r for r in strict.rejected if r.kind == "scale"]
    assert rej.change is not None and 1e-10 < rej.change < 1e-3 and "eps=1e-05" in rej.reason
    # a breaking larger than approx_tol is rejected and says so
    tight = find_symmetries(model, x, explain=True, approx_tol=sc.breaking / 2)
    assert "scale" not in {s.kind for s in tight}
    assert any("approx_tol" in r.reason for r in tight.rejected)


def test_verify_measures_a_broken_symmetry():
    """A hand-written rescale of the residual pattern is not a symmetry: verify says so."""
    torch.manual_seed(0)
    model, x = ResidualAcrossHidden().to(D), torch.randn(*X2, dtype=D)
    fake = Symmetry("rescale", "r1 → relu → r2", (
        ParamSlice("r1.weight", "in", 0), ParamSlice("r1.bias", "in", 0),
        ParamSlice("r2.weight", "out", 1)), 4)
    assert verify_symmetry(model, fake, x) > 1e-2
    before = [p.detach().clone() for p in model.parameters()]
    verify_symmetry(model, fake, x, trials=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored


def test_float32_uses_float32_tolerance():
    torch.manual_seed(0)
    model, x = HandAttention(), torch.randn(*X3)
    report = find_symmetries(model, x, explain=True)
    assert len(report) == 6 and max(report.changes) <= 1e-5


def test_train_mode_dropout_keeps_rescale_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2)).to(D)
    kinds = {s.kind for s in find_symmetries(model, torch.randn(8, 4, dtype=D))}
    assert kinds == {"rescale"}  # same seed, same masks; permuting units moves the masks
    kinds_eval = {s.kind for s in find_symmetries(model.eval(), torch.randn(8, 4, dtype=D))}
    assert kinds_eval == {"rescale", "permutation"}


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.f(x)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.g, self.h = DataDependent(), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.h(F.relu(self.g(self.inner(x))))


class Hopeless(nn.Module):
    """Data-dependent Python in the model's own forward and no submodule to fall back to."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        if x.sum() > 0:
            return x @ self.w
        return x


def test_an_untraceable_block_stays_opaque_and_the_rest_is_searched():
    x = -torch.rand(2, 3)  # x.sum() < 0: inner.f is never called, inner has nothing to split
    report = find_symmetries(Outer(), x, explain=True, progress=False)
    assert {(s.kind, s.location.split()[0]) for s in report} == {("rescale", "g"), ("permutation", "g")}
    (opaque,) = report.opaque
    assert opaque.path == "inner" and "if x.sum() > 0" in opaque.reason
    assert "analysed via fx: with inner opaque" in str(report)
    # x.sum() > 0: inner is split and its Linear analysed on its own
    blocks = find_symmetries(Outer(), -x, explain=True, progress=False).blocks
    assert [(b.path, b.status) for b in blocks] == [("", "analysed"), ("inner", "split"),
                                                    ("inner.f", "analysed")]
    syms = find_symmetries(Outer(), x, leaf_modules=[DataDependent], explain=True)
    assert {(s.kind, s.location.split()[0]) for s in syms} == {("rescale", "g"), ("permutation", "g")}
    assert not syms.opaque


def test_untraceable_model_names_the_failing_op_and_the_way_out():
    with pytest.raises(UntraceableModelError) as info:
        find_symmetries(Hopeless(), torch.randn(2, 3), progress=False)
    msg = str(info.value)
    assert "Hopeless" in msg and "if x.sum() > 0" in msg and "leaf_modules" in msg


def test_bad_inputs():
    model, x = _build("sequential_mlp")
    with pytest.raises(TypeError, match="nn.Module"):
        find_symmetries(lambda z: z, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_inputs"):
        find_symmetries(model, [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trials"):
        find_symmetries(model, x, trials=0)
    with pytest.raises(ValueError, match="tol"):
        find_symmetries(model, x, tol=-1.0)
    with pytest.raises(UntraceableModelError, match="example_inputs"):
        find_symmetries(model, torch.randn(7, 4, dtype=D))  # wrong feature size
    with pytest.raises(TypeError, match="Symmetry"):
        verify_symmetry(model, "rescale", x)  # type: ignore[arg-type]
    sym = find_symmetries(model, x)[0]
    with pytest.raises(TypeError, match="inputs"):
        verify_symmetry(model, sym, ())


def test_public_names():
    for name in ("find_symmetries", "verify_symmetry", "Symmetry", "charge_equilibrium",
                 "ChargeEquilibrium", "SymmetryReport", "UntraceableModelError"):
        assert hasattr(nt, name), name


def test_legacy_weight_norm_is_detected():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 2)).to(D)
    syms = find_symmetries(model, torch.randn(*X2, dtype=D))
    assert sorted(s.kind for s in syms) == ["permutation", "rescale", "scale"]
