"""per_sample_grad_norms against an independent reference: a loop of b separate backward passes.

Everything is float64, where both sides are exact up to rounding (~1e-16 relative per operation),
so rtol 1e-10 leaves six orders of magnitude for accumulated rounding and none for a wrong formula.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _helpers import DT, RTOL, LossFn, assert_matches_naive
from neurothermo.gradstats import FallbackWarning, Rule, per_sample_grad_norms, register_rule
from neurothermo.gradstats._pieces import Dense, Piece


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(inplace=True),
                         nn.Linear(6, 3)).to(DT)


class SeqMLP(nn.Module):
    """Linear layers on [b, T, d] (the Gram form) with a residual."""

    def __init__(self, d: int = 4, t_out: int = 3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, 9), nn.Linear(9, d)
        self.head = nn.Linear(d, t_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.b(torch.tanh(self.a(x)))).mean(1)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d(6), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 6, 2, padding="same", padding_mode="circular", bias=False),
        nn.InstanceNorm2d(6, affine=True), nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
    ).to(DT)


def cnn1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, padding="same", dilation=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(4, 4, 2, stride=2, groups=4), nn.BatchNorm1d(4), nn.Flatten(),
        nn.Linear(8, 2),
    ).to(DT)


class TinyTransformer(nn.Module):
    """Embedding + positions, pre-norm attention and MLP blocks, RMSNorm, linear head."""

    def __init__(self, vocab: int = 11, d: int = 8, t: int = 6, need_weights: bool = False
                 ) -> None:
        super().__init__()
        self.need_weights = need_weights  # True: torch's explicit path (double-differentiable)
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(t, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tok: Tensor) -> Tensor:
        t = tok.shape[1]
        h = self.emb(tok) + self.pos(torch.arange(t).expand_as(tok))
        a = self.ln1(h)
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        h = h + self.att(a, a, a, attn_mask=causal, need_weights=self.need_weights,
                          is_causal=True)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(self.norm(h)).transpose(1, 2)  # [b, vocab, T] for CrossEntropyLoss


class TiedLM(nn.Module):
    """Embedding tied to the output layer, and one Linear applied twice."""

    def __init__(self, vocab: int = 9, d: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tok: Tensor) -> Tensor:
        h = self.emb(tok)
        h = self.mix(torch.tanh(self.mix(h)))
        return self.head(h).transpose(1, 2)


class SharedWeights(nn.Module):
    """Two Linear modules sharing one weight (separate biases); plain [b, d] activations."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, d), nn.Linear(d, d)
        self.l2.weight = self.l1.weight
        self.out = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class Gate(nn.Module):
    """Unsupported custom module: own parameters plus a child with a rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(1, d))
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.sigmoid(x * self.scale) * x) + self.shift * x.square()


def custom() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), Gate(5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


# ----------------------------------------------------------------------------- exactness


def test_mlp_with_inplace_relu() -> None:
    x, y = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
    assert_matches_naive(mlp(), nn.CrossEntropyLoss(), x, y)


def test_linear_with_sequence_axis() -> None:
    x, y = torch.randn(5, 6, 4, dtype=DT), torch.randn(5, 3, dtype=DT)
    assert_matches_naive(SeqMLP().to(DT), nn.MSELoss(), x, y)


def test_cnn_with_pooling_and_norms() -> None:
    model = cnn().eval()  # BatchNorm in eval mode uses its running statistics
    with torch.no_grad():
        model[5].running_mean.uniform_(-1, 1)
        model[5].running_var.uniform_(0.5, 2)
    x, y = torch.randn(5, 2, 16, 16, dtype=DT), torch.randint(0, 3, (5,))
    assert_matches_naive(model, nn.CrossEntropyLoss(), x, y)


def test_conv1d_same_padding_groups_batchnorm_eval() -> None:
    x, y = torch.randn(4, 3, 8, dtype=DT), torch.randn(4, 2, dtype=DT)
    assert_matches_naive(cnn1d().eval(), nn.MSELoss(), x, y)


def test_tiny_transformer() -> None:
    tok, y = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    tok[0, :2] = 0  # padding_idx rows get no gradient
    assert_matches_naive(TinyTransformer().to(DT), nn.CrossEntropyLoss(), tok, y)


def test_tied_embedding_and_reused_linear() -> None:
    tok, y = torch.randint(0, 9, (5, 4)), torch.randint(0, 9, (5, 4))
    model = TiedLM().to(DT)
    got = per_sample_grad_norms(model, nn.CrossEntropyLoss(), (tok, y), by_parameter=True)
    assert isinstance(got, dict)
    assert "head.weight" not in got  # tied: reported once, under its first name
    assert_matches_naive(model, nn.CrossEntropyLoss(), tok, y)
    # Adding the squared norms of the two uses instead would be wrong: the test can tell.
    separate = TiedLM().to(DT)
    separate.load_state_dict(model.state_dict())
    separate.head.weight = nn.Parameter(model.emb.weight.detach().clone())
    split = per_sample_grad_norms(separate, nn.CrossEntropyLoss(), (tok, y), by_parameter=True)
    assert isinstance(split, dict)
    wrong = split["emb.weight"] + split["head.weight"]
    assert not torch.allclose(wrong, got["emb.weight"], rtol=1e-3)


def test_weight_shared_by_two_linear_modules() -> None:
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    assert_matches_naive(SharedWeights().to(DT), nn.MSELoss(), x, y)


class SquaredConv(nn.Conv2d):
    """A Conv2d subclass with its own forward: no closed form, the fallback handles it."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).square()


class ConvShared(nn.Module):
    """A grouped Conv2d whose weight is shared with a fallback module: the two kinds of pieces
    (factored patches in (kernel, channel) order, dense per-sample gradients) must be added in
    the weight's own layout before squaring. On a 2×2 map the conv takes the Gram route."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.b = SquaredConv(8, 12, 3, padding=1, groups=2)
        self.b.weight = self.a.weight
        self.head = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((self.a(x).tanh() + self.b(x)).mean((2, 3)))


def test_conv_weight_shared_with_a_fallback_module(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_conv_routes(monkeypatch)
    x, y = torch.randn(4, 8, 2, 2, dtype=DT), torch.randn(4, 2, dtype=DT)
    with pytest.warns(FallbackWarning, match="SquaredConv"):
        assert_matches_naive(ConvShared().to(DT), nn.MSELoss(), x, y)
    assert seen == {"Factored.materialize"}  # the patches were put in the weight's layout


def spy_conv_routes(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Record which exact route the conv rule's weight pieces took."""
    from neurothermo.gradstats._pieces import Factored
    from neurothermo.gradstats.rules.conv import ConvWeightGrad

    seen: set[str] = set()
    for cls in (Factored, ConvWeightGrad):
        for meth in ("sq_norm", "materialize"):
            orig = getattr(cls, meth)

            def wrapped(self, *a, _orig=orig, _name=f"{cls.__name__}.{meth}", **k):
                if not isinstance(self, Factored) or self.v_layout is not None:  # conv pieces
                    seen.add(_name)
                return _orig(self, *a, **k)

            monkeypatch.setattr(cls, meth, wrapped)
    return seen


@pytest.mark.parametrize(
    ("conv", "shape", "route"),
    [
        (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=2, dilation=1), (3, 16, 2, 2), "Factored"),
        (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=2), (3, 16, 6, 6), "ConvWeightGrad"),
        (lambda: nn.Conv2d(12, 12, (3, 2), stride=(2, 1), dilation=(2, 1), padding=(2, 0),
                           padding_mode="reflect"), (3, 12, 4, 3), "Factored"),
        (lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), dilation=(2, 1), padding=(2, 0),
                           padding_mode="reflect"), (3, 3, 9, 5), "ConvWeightGrad"),
        (lambda: nn.Conv1d(16, 16, 3, padding="same", padding_mode="circular"), (3, 16, 3),
         "Factored"),
        (lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2), (3, 4, 9),
         "ConvWeightGrad"),
        (lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1), (3, 2, 3, 4, 3),
         "ConvWeightGrad"),
    ],
    ids=["2d-gram", "2d-grouped", "2d-reflect-gram", "2d-reflect-grouped", "1d-gram",
         "1d-grouped", "3d"],
)
def test_conv_routes(conv, shape, route, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = spy_conv_routes(monkeypatch)
    layer = conv().to(DT)
    with torch.no_grad():
        n_out = layer(torch.zeros(shape, dtype=DT)).flatten(1).shape[1]
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 2)).to(DT)
    x, y = torch.randn(shape, dtype=DT), torch.randn(shape[0], 2, dtype=DT)
    assert_matches_naive(model, nn.MSELoss(), x, y)
    assert seen == {f"{route}.sq_norm"}


def test_free_parameters_of_a_container_are_exact_op_by_op_without_fallback() -> None:
    # Gate owns `scale` and `shift` and contains `proj`: each use is an op with the batch
    # (x * scale, shift * x²), handled by giving the parameter a batch axis; no fallback.
    model = custom()
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(model, nn.MSELoss(), x, y)


class GateMixed(Gate):
    """``scale`` is used once with the batch and once alone (``scale.sum()``): that parameter
    must go through the fallback for BOTH uses (never counted twice); ``shift`` stays op-level."""

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.sigmoid(x * self.scale) * x) * self.scale.sum() + self.shift * x


def test_free_parameter_with_a_use_that_does_not_fit_goes_to_the_fallback_exactly() -> None:
    model = nn.Sequential(nn.Linear(4, 5), GateMixed(5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    with pytest.warns(FallbackWarning, match=r"'1' \(GateMixed\).*b × 5 numbers"):
        per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # one warning per module instance
        assert_matches_naive(model, nn.MSELoss(), x, y)


def test_leaf_custom_module_uses_exact_fallback_and_warns_once() -> None:
    class Scale(nn.Module):  # no children: the fallback (and its sample-mixing check) is kept
        def __init__(self, d: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(d))

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(x * self.w)

    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Linear(5, 2)).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    with pytest.warns(FallbackWarning, match=r"'1' \(Scale\)"):
        per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(model, nn.MSELoss(), x, y)


def test_linear_subclass_with_own_forward_is_not_given_the_linear_rule() -> None:
    class Squared(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, self.weight.square(), self.bias)

    model = nn.Sequential(Squared(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)
    with pytest.warns(FallbackWarning, match="Squared"):
        assert_matches_naive(model, nn.MSELoss(), x, y)


def test_registered_rule_is_used() -> None:
    class Scale(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(d, dtype=DT))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.w

    def scale_rule(call, deltas):  # c_i(w) = δ_i ⊙ x_i
        return [] if deltas[0] is None else [Piece(call.module.w, Dense(deltas[0] * call.args[0]))]

    register_rule(Scale, Rule(scale_rule))
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(model, nn.MSELoss(), x, y)


def test_frozen_and_unused_parameters() -> None:
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.unused = mlp(), nn.Linear(2, 2).to(DT)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    model = WithUnused()
    model.body[0].weight.requires_grad_(False)
    x, y = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    got = per_sample_grad_norms(model, nn.CrossEntropyLoss(), (x, y), by_parameter=True)
    assert isinstance(got, dict)
    assert "body.0.weight" not in got
    assert torch.equal(got["unused.weight"], torch.zeros(4, dtype=DT))
    assert_matches_naive(model, nn.CrossEntropyLoss(), x, y)


def test_single_sample_batch_equals_squared_gradient_norm() -> None:
    model = mlp()
    x, y = torch.randn(1, 5, dtype=DT), torch.randint(0, 3, (1,))
    g = torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), list(model.parameters()))
    got = per_sample_grad_norms(model, nn.CrossEntropyLoss(), (x, y))
    torch.testing.assert_close(got, sum(gi.square().sum() for gi in g).reshape(1), rtol=RTOL,
                               atol=0)


def test_invariant_to_batch_composition() -> None:
    """‖g_i‖² is a property of sample i alone: permuting or splitting the batch permutes it."""
    model = TinyTransformer().to(DT)
    tok, y = torch.randint(0, 11, (6, 6)), torch.randint(0, 11, (6, 6))
    ce = nn.CrossEntropyLoss()
    full = per_sample_grad_norms(model, ce, (tok, y))
    perm = torch.randperm(6)
    torch.testing.assert_close(per_sample_grad_norms(model, ce, (tok[perm], y[perm])), full[perm],
                               rtol=RTOL, atol=0)
    halves = torch.cat([per_sample_grad_norms(model, ce, (tok[:2], y[:2])),
                        per_sample_grad_norms(model, ce, (tok[2:], y[2:]))])
    torch.testing.assert_close(halves, full, rtol=RTOL, atol=0)


def test_float32_agrees_with_float64() -> None:
    model64 = TinyTransformer().to(DT)
    model32 = TinyTransformer()
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    tok, y = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    got = per_sample_grad_norms(model32, nn.CrossEntropyLoss(), (tok, y))
    assert isinstance(got, Tensor) and got.dtype == torch.float32
    ref = per_sample_grad_norms(model64, nn.CrossEntropyLoss(), (tok, y))
    # float32 rounding (~6e-8 per op) through a few hundred ops: 1e-4 is ample, 1e-2 would hide bugs
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------- create_graph


class ClsTokens(nn.Module):
    """timm-style model-level parameters: a class token concatenated and a position table added."""

    def __init__(self, d: int = 4, t: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, t + 1, d))
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.proj(x)], 1)
        return self.head(torch.tanh(h + self.pos_embed)[:, 0] + h.mean(1))


class RecurrentReg(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(4, 3, num_layers=2, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0].mean(1))


def naive_grad_of_sum(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> list[Tensor]:
    ps = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), dtype=DT)
    for i in range(x.shape[0]):
        g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), ps, create_graph=True)
        total = total + sum(gi.square().sum() for gi in g)
    return list(torch.autograd.grad(total, ps))


@pytest.mark.parametrize(
    ("make", "shape", "target"),
    [
        (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT), (6, 5), "cls"),
        (lambda: SeqMLP().to(DT), (4, 5, 4), "reg3"),
        (lambda: cnn().eval(), (3, 2, 16, 16), "cls"),
        (lambda: TinyTransformer(need_weights=True).to(DT), (3, 6), "tok"),
        (custom, (5, 4), "reg2"),
        (lambda: TiedLM().to(DT), (3, 4), "tok9"),
        (lambda: ClsTokens().to(DT), (4, 3, 4), "reg2"),
        (lambda: RecurrentReg(nn.LSTM).to(DT), (4, 5, 4), "reg2"),
        (lambda: RecurrentReg(nn.GRU).to(DT), (4, 5, 4), "reg2"),
        (lambda: Positions().to(DT), (4, 5), "reg2x"),
    ],
    ids=["mlp", "seq", "cnn", "transformer", "free_params", "tied", "cls_pos", "lstm", "gru",
         "broadcast"],
)
def test_create_graph_matches_double_backward_of_naive_loop(make, shape, target) -> None:
    model = make()
    if target in ("tok", "tok9"):
        v = 11 if target == "tok" else 9
        x, y, loss_fn = torch.randint(0, v, shape), torch.randint(0, v, shape), nn.CrossEntropyLoss()
    elif target == "reg2x":
        x, y, loss_fn = torch.randint(0, 9, shape), torch.randn(shape[0], 2, dtype=DT), nn.MSELoss()
    elif target == "cls":
        x, y, loss_fn = torch.randn(shape, dtype=DT), torch.randint(0, 3, shape[:1]), nn.CrossEntropyLoss()
    else:
        n_out = 3 if target == "reg3" else 2
        x, y, loss_fn = torch.randn(shape, dtype=DT), torch.randn(shape[0], n_out, dtype=DT), nn.MSELoss()
    ps = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        norms = per_sample_grad_norms(model, loss_fn, (x, y), create_graph=True)
    assert isinstance(norms, Tensor) and norms.requires_grad
    got = torch.autograd.grad(norms.sum(), ps, allow_unused=True)
    ref = naive_grad_of_sum(model, loss_fn, x, y)
    scale = max(float(r.abs().max()) for r in ref)
    for g, r in zip(got, ref):
        g = torch.zeros_like(r) if g is None else g
        torch.testing.assert_close(g, r, rtol=RTOL, atol=RTOL * 1e-2 * scale)
    assert all(p.grad is None for p in model.parameters())


def test_without_create_graph_result_is_detached_and_no_grad_is_written() -> None:
    model = mlp()
    x, y = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    out = per_sample_grad_norms(model, nn.CrossEntropyLoss(), (x, y))
    assert isinstance(out, Tensor) and not out.requires_grad
    assert all(p.grad is None for p in model.parameters())


class Positions(nn.Module):
    """Position ids of shape [1, T] broadcast over the batch (as Hugging Face passes them), a
    [1, T, d] learned table added directly, and a Linear on a batch-free [1, d] query."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.view = view
        self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(5, 4), nn.Linear(4, 2)
        self.query = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        ids = torch.arange(x.shape[1]).unsqueeze(0)
        pos = self.pos(ids)
        if self.view:  # a forward that cannot take the position rows expanded to the batch
            pos = pos.view(-1, 4)
        q = self.query(torch.ones(1, 3, dtype=pos.dtype))  # [1, 4]: broadcast too
        h = torch.tanh(self.tok(x) + pos) * q.unsqueeze(1)
        return self.head(h.mean(1))


def test_inputs_broadcast_over_the_batch_are_exact() -> None:
    x, y = torch.randint(9, (6, 5)), torch.randn(6, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(Positions().to(DT), nn.MSELoss(), x, y)


def test_broadcast_input_the_forward_cannot_expand_is_followed_as_a_shared_output() -> None:
    """The forward reshapes the [1, T, d] position rows (expanded to the batch it would fail):
    the rows are then an output every sample shares, followed to where they meet the batch."""
    x, y = torch.randint(9, (6, 5)), torch.randn(6, 2, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(Positions(view=True).to(DT), nn.MSELoss(), x, y)


class InPlacePositions(nn.Module):
    """Model-level parameters used by in-place ops on activations (``x += pos``, ``mul_``):
    each must run exactly once. ``view=True`` writes into a view (a 3-d Linear output), which
    autograd rebases: the pass is redone with the module output copied, still op by op."""

    def __init__(self, view: bool, d: int = 4, t: int = 3) -> None:
        super().__init__()
        self.view = view
        self.proj, self.head = nn.Linear(d, d), nn.Linear(d, 2)
        self.pos = nn.Parameter(torch.randn(t, d))
        self.gain = nn.Parameter(torch.randn(1, 1, d))

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x) if self.view else self.proj(x) * 1.0
        h += self.pos
        h.mul_(self.gain)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("view", [False, True])
def test_free_parameters_in_inplace_ops_run_once_and_are_exact(view: bool) -> None:
    model = InPlacePositions(view).to(DT)
    x, y = torch.randn(5, 3, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    with torch.no_grad():
        ref_out = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(model, nn.MSELoss(), x, y)
    # the model computes the same function while measured (an op run twice would add pos twice)
    seen = []
    model.head.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    torch.testing.assert_close(model.head(seen[-1]), ref_out)


class WritesIntoOutputs(nn.Module):
    """Module outputs written in place: a 3-d Linear output is a view (autograd rebases it
    when written), as is MultiheadAttention's output; a 2-d one is not."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.flat = nn.Linear(4, 4), nn.Linear(4, 4)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        h += 1.0
        a = self.att(h, h, h, need_weights=False)[0]
        a *= 2.0
        f = self.flat(a.mean(1))
        f += 0.5
        return self.head(torch.tanh(f))


def test_module_outputs_written_in_place_are_exact() -> None:
    x, y = torch.randn(5, 3, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    assert_matches_naive(WritesIntoOutputs().to(DT), nn.MSELoss(), x, y)
