"""Bad input, ill-defined per-sample gradients and state hygiene of per_sample_grad_norms."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import neurothermo as nt
from _helpers import DT, naive_total_sq_norms
from neurothermo.gradstats import FallbackWarning, per_sample_grad_norms


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)


def data(b: int = 4) -> tuple[Tensor, Tensor]:
    return torch.randn(b, 3, dtype=DT), torch.randn(b, 2, dtype=DT)


# ----------------------------------------------------------------------------- ill-defined


def test_batchnorm_in_train_mode_is_rejected_with_the_way_out() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT)
    with pytest.raises(ValueError, match=r"BatchNorm module '1' is in train mode.*model\.eval\(\)"
                       r".*GroupNorm"):
        per_sample_grad_norms(model, nn.MSELoss(), data())
    model[1].weight.requires_grad_(False)  # frozen affine: the other layers are still coupled
    with pytest.raises(ValueError, match="train mode"):
        per_sample_grad_norms(model, nn.MSELoss(), data())


def test_batchnorm_without_running_stats_is_rejected_in_eval_mode_too() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.Linear(4, 2)).to(DT).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        per_sample_grad_norms(model, nn.MSELoss(), data())


def test_module_that_mixes_samples_is_rejected() -> None:
    class Center(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=DT))

        def forward(self, x: Tensor) -> Tensor:
            return (x - x.mean(0)) * self.w

    model = nn.Sequential(nn.Linear(3, 4), Center(), nn.Linear(4, 2)).to(DT)
    with pytest.warns(FallbackWarning), pytest.raises(ValueError, match="depends on the other"):
        per_sample_grad_norms(model, nn.MSELoss(), data())


def test_random_custom_module_in_train_mode_is_rejected() -> None:
    class NoisyScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=DT))

        def forward(self, x: Tensor) -> Tensor:
            return nn.functional.dropout(x * self.w, 0.5, self.training)

    model = nn.Sequential(nn.Linear(3, 4), NoisyScale(), nn.Linear(4, 2)).to(DT)
    with pytest.warns(FallbackWarning), pytest.raises(ValueError, match="random numbers"):
        per_sample_grad_norms(model, nn.MSELoss(), data(16))
    model.eval()
    x, y = data()
    torch.testing.assert_close(per_sample_grad_norms(model, nn.MSELoss(), (x, y)),
                               naive_total_sq_norms(model, nn.MSELoss(), x, y), rtol=1e-10, atol=0)


def test_embedding_scale_grad_by_freq_is_rejected() -> None:
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(),
                          nn.Linear(6, 2)).to(DT)
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        per_sample_grad_norms(model, nn.MSELoss(), (torch.randint(0, 5, (4, 2)),
                                                   torch.randn(4, 2, dtype=DT)))


def test_parameter_used_outside_its_module_is_rejected() -> None:
    class FunctionalTie(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 3)

        def forward(self, tok: Tensor) -> Tensor:
            return (self.emb(tok) @ self.emb.weight.T).transpose(1, 2)

    model = FunctionalTie().to(DT)
    tok = torch.randint(0, 7, (3, 4))
    with pytest.raises(ValueError, match=r"'emb.weight' in 'outside any recorded module'"):
        per_sample_grad_norms(model, nn.CrossEntropyLoss(), (tok, tok))

    lin = small()
    penalised = lambda out, y: nn.functional.mse_loss(out, y) + lin[0].weight.square().sum()  # noqa: E731
    with pytest.raises(ValueError, match="penalties out of loss_fn"):
        per_sample_grad_norms(lin, penalised, data())


def test_activations_that_are_not_batch_first_are_rejected() -> None:
    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:  # [b, T, 3] -> [T, b, 3] -> Linear
            return self.lin(x.transpose(0, 1)).mean(0)

    with pytest.raises(ValueError, match="leading dimension 5.*batch-first"):
        per_sample_grad_norms(SeqFirst().to(DT), nn.MSELoss(),
                              (torch.randn(4, 5, 3, dtype=DT), torch.randn(4, 2, dtype=DT)))
    att = nn.MultiheadAttention(4, 1).to(DT)

    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = att

        def forward(self, x: Tensor) -> Tensor:
            return torch.stack([self.att(xi, xi, xi)[0].sum(0) for xi in x])

    with pytest.raises(ValueError, match="unbatched MultiheadAttention"):
        per_sample_grad_norms(Unbatched(), nn.MSELoss(),
                              (torch.randn(2, 3, 4, dtype=DT), torch.randn(2, 4, dtype=DT)))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("loss_fn", "exc", "match"),
    [
        (nn.MSELoss(reduction="sum"), ValueError, "reduction='sum'"),
        (nn.MSELoss(reduction="none"), ValueError, "reduction='none'"),
        (lambda o, y: (o - y).square().mean(1), ValueError, "scalar"),
        (lambda o, y: (o - y).square().mean().detach(), ValueError, "does not depend"),
        ("mse", TypeError, "callable"),
    ],
    ids=["sum", "none", "vector", "detached", "not-callable"],
)
def test_bad_loss_fn(loss_fn, exc, match) -> None:
    with pytest.raises(exc, match=match):
        per_sample_grad_norms(small(), loss_fn, data())


@pytest.mark.parametrize(
    ("batch", "exc", "match"),
    [
        ((torch.randn(4, 3, dtype=DT), torch.randn(3, 2, dtype=DT)), ValueError, "disagree on the batch size"),
        ((torch.randn(0, 3, dtype=DT), torch.randn(0, 2, dtype=DT)), ValueError, "empty"),
        ((torch.full((2, 3), float("nan"), dtype=DT), torch.randn(2, 2, dtype=DT)), ValueError,
         "NaN"),
        ((torch.randn(2, 3, dtype=DT), torch.full((2, 2), float("inf"), dtype=DT)), ValueError,
         "NaN or Inf"),
        ([torch.randn(2, 3, dtype=DT)], TypeError, "pair"),
        ((torch.randn(2, 3).tolist(), torch.randn(2, 2)), TypeError, "tensors"),
    ],
    ids=["mismatched", "empty", "nan-input", "inf-target", "not-a-pair", "not-tensors"],
)
def test_bad_batch(batch, exc, match) -> None:
    with pytest.raises(exc, match=match):
        per_sample_grad_norms(small(), nn.MSELoss(), batch)


def test_nan_parameter_is_named() -> None:
    model = small()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'2.weight'"):
        per_sample_grad_norms(model, nn.MSELoss(), data())


def test_bad_model_and_no_trainable_parameters() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        per_sample_grad_norms(lambda x: x, nn.MSELoss(), data())  # type: ignore[arg-type]
    frozen = small().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        per_sample_grad_norms(frozen, nn.MSELoss(), data())


# ----------------------------------------------------------------------------- state hygiene


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(5)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True, dropout=0.1)
        self.gate = nn.Parameter(torch.ones(4))
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.lin(x))
        return self.drop(self.att(h, h, h)[0]).mean(1)


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "flags": {n: m.training for n, m in model.named_modules()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                     for m in model.modules()),
        "dicts": {n: sorted(m.__dict__) for n, m in model.named_modules()},
    }


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["flags"] == b["flags"] and a["hooks"] == b["hooks"] and a["dicts"] == b["dicts"]
    for key in ("buffers", "params", "grads"):
        for n, v in a[key].items():  # type: ignore[attr-defined]
            w = b[key][n]  # type: ignore[index]
            assert (v is None and w is None) or torch.equal(v, w), f"{key} {n} changed"


def test_state_and_hooks_restored_when_loss_fn_raises() -> None:
    model = Net().to(DT)
    model.bn.eval()  # BatchNorm in eval, the rest in train mode (dropout active)
    model.lin.weight.grad = torch.ones_like(model.lin.weight)  # a pre-existing .grad is kept
    user_hook = model.lin.register_forward_hook(lambda m, i, o: None)
    before = _snapshot(model)

    def boom(out: Tensor, y: Tensor) -> Tensor:
        raise RuntimeError("loss exploded")

    x, y = torch.randn(3, 5, 4, dtype=DT), torch.randn(3, 4, dtype=DT)
    with pytest.raises(RuntimeError, match="loss exploded"):
        per_sample_grad_norms(model, boom, (x, y))
    _same(before, _snapshot(model))
    per_sample_grad_norms(model, nn.MSELoss(), (x, y), create_graph=True)
    _same(before, _snapshot(model))
    user_hook.remove()


def test_user_hooks_and_inplace_ops_are_handled_exactly() -> None:
    """A user forward hook that rescales an output, and in-place ops on recorded tensors."""

    class Scale(nn.Module):  # no rule: the fallback compares against its recorded output
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.linspace(-1, 1, 4))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.w + 0.1

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.s = Scale()

        def forward(self, x: Tensor) -> Tensor:
            h = self.a(x)
            h.relu_()  # in place on a rule's output: its δ is that of the value before the ReLU
            z = self.b(h)
            z.mul_(2.0)  # in place on an output that a user hook has already replaced
            u = self.s(z)
            u.relu_()  # in place on the fallback's output: the pass is redone with copies
            return self.c(u.tanh() + h)

    model = InPlace().to(DT)
    model.b.register_forward_hook(lambda m, i, o: 3.0 * o)
    x, y = data(5)
    with pytest.warns(FallbackWarning):
        got = per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    torch.testing.assert_close(got, naive_total_sq_norms(model, nn.MSELoss(), x, y), rtol=1e-10, atol=0)


def test_module_torch_func_cannot_run_gets_a_clear_error() -> None:
    class OldStyle(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):  # type: ignore[override]
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            x, w = ctx.saved_tensors
            return g * w, g * x

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x: Tensor) -> Tensor:
            return OldStyle.apply(x, self.w)

    model = nn.Sequential(Custom(), nn.Linear(3, 2)).to(DT)
    with pytest.warns(FallbackWarning), pytest.raises(ValueError, match="register_rule"):
        per_sample_grad_norms(model, nn.MSELoss(), data())


def test_a_module_without_a_batch_axis_is_followed_to_the_batch_or_frozen() -> None:
    """T5's relative_attention_bias (an Embedding on [q_len, k_len] position buckets, its output
    shared by every sample): measured where its output meets the batch, equal to the per-sample
    loop; with it frozen (the way out a refusal names), the rest is equally exact."""
    pytest.importorskip("transformers")
    import torch.nn.functional as F
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(1, 32, (4, 6), generator=g),  # 6 tokens ≠ 4 samples
         "decoder_input_ids": torch.randint(1, 32, (4, 5), generator=g)}
    y = torch.randint(1, 32, (4, 5), generator=g)

    def ce(out, t):
        return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), t.reshape(-1))

    def loop() -> Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        ref = []
        for i in range(4):
            gs = torch.autograd.grad(ce(model(**{k: v[i:i + 1] for k, v in x.items()}),
                                        y[i:i + 1]), params, allow_unused=True)
            ref.append(sum(t.square().sum() for t in gs if t is not None))
        return torch.stack(ref)

    for frozen in (False, True):
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.requires_grad_(not frozen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = nt.per_sample_grad_norms(model, ce, (x, y))
        torch.testing.assert_close(got, loop(), rtol=1e-12, atol=0)
