"""BackwardCapture: per-sample norms read from the caller's own pass, against a per-sample loop."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from _helpers import DT, RTOL, naive_total_sq_norms
from neurothermo.gradstats import FallbackWarning
from neurothermo.gradstats.passive import BackwardCapture, capturable


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class _Tokens(nn.Module):
    """Embedding → LayerNorm → mean over the sequence → Linear (tied nothing, all rules)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.emb(x)).mean(1))


def _cases() -> dict[str, tuple[nn.Module, Tensor, Tensor, nn.Module]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 2)).to(DT)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 5 * 5, 4)).to(DT)
    return {
        "mlp": (mlp, torch.randn(9, 5, generator=g, dtype=DT), torch.randn(9, 2, generator=g, dtype=DT),
                nn.MSELoss()),
        "cnn": (cnn, torch.randn(6, 2, 5, 5, generator=g, dtype=DT), torch.randint(4, (6,), generator=g),
                nn.CrossEntropyLoss()),
        "tokens": (_Tokens().to(DT), torch.randint(11, (8, 4), generator=g), torch.randint(3, (8,), generator=g),
                   nn.CrossEntropyLoss()),
    }


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("case", ["mlp", "cnn", "tokens"])
def test_norms_from_the_callers_pass_match_the_per_sample_loop(case: str) -> None:
    model, x, y, loss_fn = _cases()[case]
    params = _params(model)
    assert capturable(model, params) is None
    ref = naive_total_sq_norms(model, loss_fn, x, y)
    plain = torch.autograd.grad(loss_fn(model(x), y), list(params.values()))
    cap = BackwardCapture(model, params)
    cap.arm()
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    got = cap.norms(batch_size=x.shape[0])
    assert got is not None, cap.reason
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)
    # the caller's gradients are bit for bit those of a pass without the capture
    for p, g in zip(params.values(), plain):
        assert torch.equal(p.grad, g)
    assert _no_hooks(model) and not cap.armed


def _step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    nn.functional.mse_loss(model(x), y).backward()


def test_unusable_passes_give_none_with_the_reason() -> None:
    model, x, y, _ = _cases()["mlp"]
    cap = BackwardCapture(model, _params(model))

    cap.arm()
    model(x[:3]).sum().backward()
    _step(model, x, y)  # gradient accumulation: two forwards before norms()
    assert cap.norms(x.shape[0]) is None and "more than once" in (cap.reason or "")

    cap.arm()
    _step(model, x, y)
    assert cap.norms(4) is None and "had 9 samples" in (cap.reason or "")

    cap.arm()
    assert cap.norms(9) is None and "no forward" in (cap.reason or "")

    cap.arm()
    model(x)
    assert cap.norms(9) is None and "no backward" in (cap.reason or "")

    cap.arm()
    with torch.no_grad():
        model(x)  # evaluation forwards are ignored
    xi = x.clone()
    nn.functional.mse_loss(model(xi), y).backward()
    xi.mul_(2.0)  # the recorded input of the first layer changes before the rules read it
    assert cap.norms(9) is None and "modified in place" in (cap.reason or "")

    cap.arm()
    with pytest.raises(RuntimeError):
        model(x[:, :3])  # shape error inside the forward
    assert cap.norms(9) is None and "raised" in (cap.reason or "")
    assert _no_hooks(model)

    cap.arm()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    assert cap.norms(9) is None and "more than once" in (cap.reason or "")
    assert _no_hooks(model)


def test_fallback_module_parameters_are_captured() -> None:
    # A module without a rule but with a child that has one, inside the caller's pass: its own
    # parameters count (they were silently left out when only the guarded pass recorded which
    # were used). The capture now runs that guard too, so they are batched op by op, as in the
    # extra pass, and need no torch.func fallback.
    from test_gradstats_norms import custom

    torch.manual_seed(0)
    model = custom()
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    plain = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
    cap = BackwardCapture(model, _params(model))
    cap.arm()
    _step(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = cap.norms(6)
    for p, g in zip(model.parameters(), plain):  # the caller's gradients, bit for bit
        assert torch.equal(p.grad, g)
    assert got is not None, cap.reason
    torch.testing.assert_close(got, naive_total_sq_norms(model, nn.MSELoss(), x, y), rtol=RTOL,
                               atol=0)


class _Positions(nn.Module):
    """Position ids of shape [1, T], as Hugging Face passes them; ``use`` says how the position
    embeddings meet the batch: a broadcasting add, or a matmul (no bit-for-bit batched form)."""

    def __init__(self, use: str = "add") -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(5, 4), nn.Linear(4, 2)
        self.use = use

    def forward(self, x: Tensor) -> Tensor:
        ids = torch.arange(x.shape[1]).unsqueeze(0)
        pos = self.pos(ids).to(x.device)  # (a no-op cast, as in HF GPT-2)
        h = self.tok(x)
        if self.use == "add":
            h = h + pos
        elif self.use == "matmul":
            h = h + pos @ torch.eye(4, dtype=pos.dtype)
        else:  # "inplace": written into a [1, T, d] tensor, which the expansion could not take
            acc = torch.zeros(1, x.shape[1], 4, dtype=h.dtype)
            acc += pos
            h = h + acc
        return self.head(h.mean(1))


def test_broadcast_input_is_captured_and_the_callers_pass_is_unchanged() -> None:
    model = _Positions().to(DT)
    x, y = torch.randint(9, (6, 5)), torch.randn(6, 2, dtype=DT)
    plain = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
    cap = BackwardCapture(model, _params(model))
    cap.arm()
    _step(model, x, y)
    got = cap.norms(6)
    assert got is not None, cap.reason
    torch.testing.assert_close(got, naive_total_sq_norms(model, nn.MSELoss(), x, y), rtol=RTOL,
                               atol=0)
    for p, g in zip(model.parameters(), plain):
        assert torch.equal(p.grad, g)
    assert _no_hooks(model)


@pytest.mark.parametrize(("use", "op"), [("matmul", "matmul"), ("inplace", "add_")])
def test_broadcast_output_in_a_non_broadcasting_op_gives_none_and_keeps_the_pass(use: str, op: str
                                                                                 ) -> None:
    # a matmul of the [1, T, d] output need not give the same bits on its expansion to the
    # batch, and an in-place add into a [1, T, d] tensor cannot take it: the op gets the
    # original, the caller's pass is its own and the capture declines
    model = _Positions(use).to(DT)
    x, y = torch.randint(9, (6, 5)), torch.randn(6, 2, dtype=DT)
    plain = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
    cap = BackwardCapture(model, _params(model))
    cap.arm()
    _step(model, x, y)
    assert cap.norms(6) is None and "'pos'" in (cap.reason or "") and op in (cap.reason or "")
    for p, g in zip(model.parameters(), plain):
        assert torch.equal(p.grad, g)
    assert _no_hooks(model)


class _Root(nn.Module):
    """The model's own parameters next to its children (timm's cls_token / pos_embed layout)."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.bias = nn.Parameter(torch.linspace(-1, 1, 4))
        self.mix = nn.Parameter(torch.eye(4) + 0.1)
        self.use = use

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x) + self.bias)
        if self.use == "matmul":
            h = h @ self.mix  # a parameter in an op without a bit-for-bit batched form
        return self.head(h)


@pytest.mark.parametrize("use", ["add", "matmul"])
def test_top_level_parameters(use: str) -> None:
    torch.manual_seed(0)
    model = _Root(use).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    params = _params(model) if use == "matmul" else {n: p for n, p in _params(model).items()
                                                     if n != "mix"}
    assert capturable(model, params) is None
    plain = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(params.values()))
    cap = BackwardCapture(model, params)
    cap.arm()
    model.zero_grad(set_to_none=True)
    _step(model, x, y)
    got = cap.norms(7)
    if use == "add":
        assert got is not None, cap.reason
        ref = naive_total_sq_norms(model, nn.MSELoss(), x, y)  # (mix gets no gradient here)
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)
    else:
        assert got is None and "mix" in (cap.reason or "") and "matmul" in (cap.reason or "")
    for p, g in zip(params.values(), plain):
        assert torch.equal(p.grad, g)
    assert _no_hooks(model)
    lin = nn.Linear(3, 2)
    assert "top-level" in (capturable(lin, _params(lin)) or "")  # a root with a rule: declined


def test_attention_is_not_captured() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True))
    reason = capturable(model, _params(model))
    assert reason is not None and "MultiheadAttention" in reason


class _Scale(nn.Module):
    """A module with a parameter and no closed-form rule: measured by the torch.func fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, 7, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.s)


def test_fallback_modules_are_in_the_captured_norms() -> None:
    # The fallback evaluates only the parameters an op touched; the passive capture runs without
    # the mode that records them, and once dropped every fallback parameter from the norms.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), _Scale(), nn.Linear(7, 2)).to(DT)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
    ref = naive_total_sq_norms(model, nn.MSELoss(), x, y)
    cap = BackwardCapture(model, _params(model))
    cap.arm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time FallbackWarning
        nn.MSELoss()(model(x), y).backward()
        got = cap.norms((x, y))
    assert got is not None, cap.reason
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)


class _WithLoss(nn.Module):
    """Returns its own mean loss, as Hugging Face models do when given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(self.net(x), y)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_scaled_backward_of_the_returned_loss_gives_none(scale: float) -> None:
    # (a Trainer under DDP backpropagates its loss times the number of ranks: every ‖g_i‖² read
    # from that backward would be scale² too large)
    torch.manual_seed(0)
    model = _WithLoss().to(DT)
    x, y = torch.randn(6, 5, dtype=DT), torch.randn(6, 2, dtype=DT)
    cap = BackwardCapture(model, _params(model))
    cap.arm()
    (scale * model(x, y)).backward()
    got = cap.norms(6)
    if scale == 1.0:
        assert got is not None, cap.reason
        torch.testing.assert_close(got, naive_total_sq_norms(model.net, nn.MSELoss(), x, y),
                                   rtol=RTOL, atol=0)
    else:
        assert got is None and "scaled by 2" in (cap.reason or "")
