"""One rule for the train/eval mode of every second-order measurement, warnings when the mode or
Dropout changes the answer, low-precision models, and non-scalar losses (issues 15.4, 15.5, 17.14,
17.16).

Rule: ``mode=None`` (default) measures the model in its current flags; ``"train"``/``"eval"`` set
them for the call and restore them after. A ``ModeWarning`` names train-mode BatchNorm (under
``mode=None``) and active Dropout modules.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurothermo as nt
from neurothermo._state import ModeWarning

CE = nn.CrossEntropyLoss()


def bn_dropout_net(p: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(16, 3))


def dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))


def data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


def no_mode_warning():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", ModeWarning)
    return ctx


# ------------------------------------------------------------------ the mode rule
def test_default_mode_is_the_models_current_mode_everywhere() -> None:
    model, batch = bn_dropout_net(), data()
    model.train()
    with pytest.warns(ModeWarning, match=r"BatchNorm '1' is in train mode"):
        default = nt.top_eigenvalues(model, CE, batch, tol=1e-6)
    assert model.training and model[1].training  # flags restored
    train = nt.top_eigenvalues(model, CE, batch, tol=1e-6, mode="train")
    evald = nt.top_eigenvalues(model, CE, batch, tol=1e-6, mode="eval")
    assert default.lambda_max == train.lambda_max
    # the choice matters on this net (BN batch statistics and dropout): the control
    assert abs(train.lambda_max - evald.lambda_max) > 0.05 * evald.lambda_max
    model.eval()
    ctx = no_mode_warning()
    try:
        assert nt.top_eigenvalues(model, CE, batch, tol=1e-6).lambda_max == evald.lambda_max
        tr = nt.hessian_trace(model, CE, batch, n_samples=4, mode=None)
        assert tr.estimate == nt.hessian_trace(model, CE, batch, n_samples=4, mode="eval").estimate
    finally:
        ctx.__exit__(None, None, None)
    assert not model.training


def test_entropic_force_follows_the_same_rule() -> None:
    model, batch = bn_dropout_net(p=0.0), data()
    model.train()
    with pytest.warns(ModeWarning, match="BatchNorm"):
        default = flat(nt.entropic_force(model, CE, batch, lr=0.1))
    explicit_train = flat(nt.entropic_force(model, CE, batch, lr=0.1, mode="train"))
    as_eval = flat(nt.entropic_force(model, CE, batch, lr=0.1, mode="eval"))
    assert model.training
    torch.testing.assert_close(default, explicit_train, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(flat(nt.entropic_force(model, CE, batch, lr=0.1)), as_eval,
                               rtol=0, atol=0)
    assert (as_eval - explicit_train).norm() > 0.05 * as_eval.norm()  # the mode matters here


def test_tracker_default_is_current_mode() -> None:
    model, batch = bn_dropout_net(p=0.0), data()
    model.eval()
    lam_eval = nt.top_eigenvalues(model, CE, batch, tol=1e-6).lambda_max
    model.train()
    with pytest.warns(ModeWarning, match="SharpnessTracker.update"):
        r = nt.SharpnessTracker(tol=1e-6).update(model, CE, batch)
    assert r.lambda_max == pytest.approx(nt.top_eigenvalues(model, CE, batch, tol=1e-6,
                                                            mode="train").lambda_max, rel=1e-5)
    assert abs(r.lambda_max - lam_eval) > 0.05 * lam_eval
    with pytest.raises(ValueError, match="mode must be None"):
        nt.SharpnessTracker(mode="test")


# ------------------------------------------------------------------ Dropout
def _calls():
    return {
        "entropic_force": lambda m, b: nt.entropic_force(m, CE, b, lr=0.1),
        "expected_entropic_force": lambda m, b: nt.expected_entropic_force(m, CE, b, lr=0.1, batch_size=4),
        "entropic_decomposition": lambda m, b: nt.entropic_decomposition(m, CE, b, lr=0.1, batch_size=4),
        "EntropicRegularizer": lambda m, b: nt.EntropicRegularizer(lr=0.1)(m, CE, b),
        "hvp": lambda m, b: nt.hvp(m, CE, b, {n: torch.ones_like(p) for n, p in m.named_parameters()}),
        "top_eigenvalues": lambda m, b: nt.top_eigenvalues(m, CE, b, tol=1e-2),
        "hessian_trace": lambda m, b: nt.hessian_trace(m, CE, b, n_samples=2),
        "SharpnessTracker.update": lambda m, b: nt.SharpnessTracker(tol=1e-2).update(m, CE, b),
        "per_sample_grad_norms": lambda m, b: nt.per_sample_grad_norms(m, CE, b),
        "gradient_noise": lambda m, b: nt.gradient_noise(m, CE, b, batch_size=8),
    }


@pytest.mark.parametrize("fn", list(_calls()), ids=list(_calls()))
def test_active_dropout_warns_in_every_function_it_randomises(fn: str) -> None:
    model, batch = dropout_net(), data()
    model.train()
    with pytest.warns(ModeWarning, match=r"active Dropout in '2'.*model\.eval\(\).*mode='eval'"):
        _calls()[fn](model, batch)
    model.eval()  # the control: no random layer, no warning
    ctx = no_mode_warning()
    try:
        _calls()[fn](model, batch)
    finally:
        ctx.__exit__(None, None, None)


class FunctionalDropoutNet(nn.Module):
    """Dropout applied as a function with a probability held as a float attribute, as Hugging
    Face attention does (``F.dropout(w, p=self.attention_dropout, training=self.training)``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.attention_dropout = nn.Linear(6, 16), nn.Linear(16, 3), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(torch.tanh(self.fc1(x)), p=self.attention_dropout, training=self.training)
        return self.fc2(h)


def test_functional_dropout_is_named_with_its_attribute_and_randomises() -> None:
    batch = data()
    model = FunctionalDropoutNet(0.3).train()
    with pytest.warns(ModeWarning, match=r"active Dropout in 'FunctionalDropoutNet "
                                         r"\(attention_dropout=0\.3\)'"):
        a = nt.per_sample_grad_norms(model, CE, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModeWarning)
        b = nt.per_sample_grad_norms(model, CE, batch)
    assert (a - b).norm() > 0.05 * a.norm()  # what the warning says: the value is random
    ctx = no_mode_warning()  # the controls: p = 0 in train mode, and p > 0 in eval mode
    try:
        nt.per_sample_grad_norms(FunctionalDropoutNet(0.0).train(), CE, batch)
        nt.per_sample_grad_norms(model.eval(), CE, batch)
    finally:
        ctx.__exit__(None, None, None)


def test_dropout_randomises_entropic_force_and_eval_does_not() -> None:
    model, batch = dropout_net(), data()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModeWarning)
        a = flat(nt.entropic_force(model, CE, batch, lr=0.1))
        b = flat(nt.entropic_force(model, CE, batch, lr=0.1))
        assert (a - b).norm() > 0.05 * a.norm()  # what the warning reports
        torch.manual_seed(3)
        c = flat(nt.entropic_force(model, CE, batch, lr=0.1))
        torch.manual_seed(3)
        d = flat(nt.entropic_force(model, CE, batch, lr=0.1))
    torch.testing.assert_close(c, d, rtol=0, atol=0)  # the way out the warning names: a seed
    e = flat(nt.entropic_force(model, CE, batch, lr=0.1, mode="eval"))
    f = flat(nt.entropic_force(model, CE, batch, lr=0.1, mode="eval"))
    torch.testing.assert_close(e, f, rtol=0, atol=0)
    assert model.training


# ------------------------------------------------------------------ low precision
def trained_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = data(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    return model, (x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_gives_the_float32_answer_at_its_weights(dtype: torch.dtype) -> None:
    """The reference is float32 arithmetic at the low-precision model's own (rounded) weights: the
    only difference left is the solver's, ≤ tol·λ each, so 3·tol. Before, bfloat16 arithmetic gave
    λ ≈ 20 % low with converged=True."""
    model, (x0, y) = trained_mlp()
    low = model.to(dtype)
    x = x0.to(dtype).float()  # the inputs the low-precision model sees, exactly
    ref_model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    ref_model.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    tol = 1e-4
    ref = nt.top_eigenvalues(ref_model, CE, (x, y), k=2, tol=tol)
    res = nt.top_eigenvalues(low, CE, (x.to(dtype), y), k=2, tol=tol)
    assert res.converged
    assert torch.allclose(res.values, ref.values, rtol=3 * tol, atol=0)
    assert res.vectors[0]["0.weight"].dtype == torch.float32
    assert all(p.dtype == dtype for p in low.parameters())  # the model is untouched
    tr = nt.hessian_trace(low, CE, (x.to(dtype), y), n_samples=8)
    tr_ref = nt.hessian_trace(ref_model, CE, (x, y), n_samples=8)
    assert tr.estimate == pytest.approx(tr_ref.estimate, rel=1e-5)
    f_low = flat(nt.entropic_force(low, CE, (x.to(dtype), y), lr=0.1))
    f_ref = flat(nt.entropic_force(ref_model, CE, (x, y), lr=0.1))
    torch.testing.assert_close(f_low, f_ref, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ non-scalar losses
@pytest.mark.parametrize("fn", ["top_eigenvalues", "hessian_trace", "hvp", "hvp_fwd", "tracker",
                                "entropic_force"])
def test_a_per_sample_loss_is_refused_with_its_shape(fn: str) -> None:
    model, batch = dropout_net().eval(), data(8)

    def per_sample(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(o, t, reduction="none")

    v = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    call = {
        "top_eigenvalues": lambda: nt.top_eigenvalues(model, per_sample, batch),
        "hessian_trace": lambda: nt.hessian_trace(model, per_sample, batch, n_samples=2),
        "hvp": lambda: nt.hvp(model, per_sample, batch, v),
        "hvp_fwd": lambda: nt.hvp(model, per_sample, batch, v, method="forward_over_reverse"),
        "tracker": lambda: nt.SharpnessTracker().update(model, per_sample, batch),
        "entropic_force": lambda: nt.entropic_force(model, per_sample, batch, lr=0.1),
    }[fn]
    with pytest.raises(ValueError, match=r"loss_fn returned a tensor of shape \(8,\)"):
        call()


# ------------------------------------------------------------------ graph reuse
def test_graph_reuse_over_microbatches_is_decided_by_size_and_changes_nothing(monkeypatch) -> None:
    import importlib

    from neurothermo.curvature import hessian_operator

    hvp_module = importlib.import_module("neurothermo.curvature.hvp")  # the package re-exports hvp()

    model, batch = trained_mlp()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=torch.Generator().manual_seed(0))
    with hessian_operator(model, CE, batch, microbatch_size=16, cache=False) as op:
        ref = op.matmat(V)
        assert not op.cached
    with hessian_operator(model, CE, batch, microbatch_size=16) as op:
        assert op.cached and op.graph_bytes is not None and op.graph_bytes > 0
        torch.testing.assert_close(op.matmat(V), ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(op.matmat(V), ref, rtol=1e-6, atol=1e-7)  # the graph survives
    monkeypatch.setattr(hvp_module, "graph_budget", lambda device: 0)  # graphs do not fit
    with hessian_operator(model, CE, batch, microbatch_size=16) as op:
        assert not op.cached
        torch.testing.assert_close(op.matmat(V), ref, rtol=0, atol=0)


# ------------------------------------------------------------------ no double backward
def bag_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.EmbeddingBag(30, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def test_a_layer_without_a_second_derivative_is_named_with_the_ways_out() -> None:
    """nn.EmbeddingBag's backward has no derivative in PyTorch: every second-order function says
    so, naming the op, the layer and the ways out, and each way out then works (finite
    differences against a float64 central difference of gradients; θ without the bag against the
    dense Hessian of the head)."""
    model = bag_net()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 30, (4, 6), generator=g), torch.randint(0, 3, (4,), generator=g)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64)
         for n, p in model.named_parameters()}
    calls = {
        "hvp": lambda: nt.hvp(model, CE, (x, y), v),
        "entropic_force": lambda: nt.entropic_force(model, CE, (x, y), lr=0.1),
        "top_eigenvalues": lambda: nt.top_eigenvalues(model, CE, (x, y), tol=1e-2),
        "hessian_trace": lambda: nt.hessian_trace(model, CE, (x, y), n_samples=2),
    }
    for call in calls.values():
        with pytest.raises(NotImplementedError, match=r"'_embedding_bag_backward'.*nn\.EmbeddingBag"
                                                      r".*method='finite_difference'.*param_filter"):
            call()
    params = dict(model.named_parameters())

    def grad_at(step: float) -> torch.Tensor:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(step * v[n])
        gr = torch.autograd.grad(CE(model(x), y), list(params.values()))
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(step * v[n])
        return torch.cat([t.reshape(-1) for t in gr])

    ref = (grad_at(1e-5) - grad_at(-1e-5)) / 2e-5  # O(h²) ≈ 1e-10 truncation, 1e-11 round-off
    fd = flat(nt.hvp(model, CE, (x, y), v, method="finite_difference"))
    torch.testing.assert_close(fd, ref, rtol=1e-7, atol=1e-8)
    head = ["2.weight", "2.bias"]
    hv = nt.hvp(model, CE, (x, y), {n: v[n] for n in head}, param_filter=head)

    def head_loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return CE(torch.relu(model[0](x)) @ w.T + b, y)

    hw, hb = torch.autograd.functional.hessian(head_loss, (params["2.weight"].detach(),
                                                           params["2.bias"].detach()))
    dense = torch.cat([torch.cat([hw[0].reshape(24, 24), hw[1].reshape(24, 3)], 1),
                       torch.cat([hb[0].reshape(3, 24), hb[1].reshape(3, 3)], 1)])
    torch.testing.assert_close(flat(hv), dense @ torch.cat([v[n].reshape(-1) for n in head]),
                               rtol=1e-12, atol=1e-12)
