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
    # A module without a rule (torch.func fallback) inside the caller's pass: its parameters
    # count (they were silently left out when only the guarded pass recorded which were used).
    from test_gradstats_norms import custom

    torch.manual_seed(0)
    model = custom()
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    cap = BackwardCapture(model, _params(model))
    cap.arm()
    _step(model, x, y)
    with pytest.warns(FallbackWarning, match="Gate"):
        got = cap.norms(6)
    assert got is not None, cap.reason
    torch.testing.assert_close(got, naive_total_sq_norms(model, nn.MSELoss(), x, y), rtol=RTOL,
                               atol=0)


def test_broadcast_input_gives_none_with_the_reason() -> None:
    class Positions(nn.Module):  # position ids of shape [1, T], as Hugging Face passes them
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(5, 4), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            ids = torch.arange(x.shape[1]).unsqueeze(0)
            return self.head((self.tok(x) + self.pos(ids)).mean(1))

    model = Positions().to(DT)
    x, y = torch.randint(9, (6, 5)), torch.randn(6, 2, dtype=DT)
    cap = BackwardCapture(model, _params(model))
    cap.arm()
    _step(model, x, y)
    assert cap.norms(6) is None and "leading dimension 1" in (cap.reason or "")
    assert _no_hooks(model)


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
