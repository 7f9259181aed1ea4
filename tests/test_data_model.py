"""The one data model (``neurothermo._data``, ``docs/data.md``): forms every function accepts, the
reductions over several batches, and the errors for bad input."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import neurothermo as nt
from neurothermo._data import as_batch, as_data

DT = torch.float64


class KwModel(nn.Module):
    """A model called with keyword inputs that can also return its own mean loss."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None
                ) -> dict[str, Tensor | None]:
        w = attention_mask.to(self.emb.weight.dtype).unsqueeze(-1)
        h = (torch.tanh(self.emb(input_ids)) * w).sum(1) / w.sum(1)
        logits = self.lin(h)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"logits": logits, "loss": loss}


def _kw_data(n: int = 6) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (n, 5), generator=g)
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[::2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g)


def _logits_ce(out: dict[str, Tensor], y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out["logits"], y)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def _xy(n: int = 7) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


def test_mapping_inputs_and_model_loss_agree_with_a_loss_fn() -> None:
    torch.manual_seed(0)
    model = KwModel().to(DT)
    x, y = _kw_data()
    own = {**x, "labels": y}
    a = nt.entropic_force(model, _logits_ce, (x, y), lr=0.1)
    b = nt.entropic_force(model, nt.model_loss, own, lr=0.1)
    assert torch.allclose(_flat(a), _flat(b), rtol=1e-12, atol=0)
    na = nt.per_sample_grad_norms(model, _logits_ce, (x, y))
    nb = nt.per_sample_grad_norms(model, None, own)
    # reference: one backward per sample
    ref = []
    for i in range(6):
        out = model(x["input_ids"][i:i + 1], x["attention_mask"][i:i + 1])
        gs = torch.autograd.grad(_logits_ce(out, y[i:i + 1]), list(model.parameters()))
        ref.append(sum(g.square().sum() for g in gs))
    assert torch.allclose(na, torch.stack(ref), rtol=1e-10, atol=0)
    assert torch.equal(na, nb)


def test_batch_encoding_is_a_mapping() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = KwModel().to(DT)
    x, y = _kw_data()
    enc = transformers.BatchEncoding(x)
    a = nt.hvp(model, _logits_ce, (enc, y), torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT))
    b = nt.hvp(model, _logits_ce, (x, y), torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT))
    assert torch.equal(_flat(a), _flat(b))


def test_unequal_batches_are_weighted_by_size() -> None:
    model, (x, y) = _mlp(), _xy(7)
    whole = nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.1)
    parts = [(x[:5], y[:5]), (x[5:], y[5:])]
    split = nt.entropic_force(model, nn.MSELoss(), parts, lr=0.1)
    assert torch.allclose(_flat(whole), _flat(split), rtol=1e-12, atol=1e-15)
    # the same batches weighted 1/2 each (the wrong reduction) give a different force
    halves = [nt.entropic_force(model, nn.MSELoss(), p, lr=0.1) for p in parts]
    wrong = (_flat(halves[0]) + _flat(halves[1])) / 2
    assert not torch.allclose(_flat(whole), wrong, rtol=1e-3)
    d1 = nt.entropic_decomposition(model, nn.MSELoss(), (x, y), lr=0.1, batch_size=2)
    d2 = nt.entropic_decomposition(model, nn.MSELoss(), DataLoader(TensorDataset(x, y), batch_size=3),
                                   lr=0.1, batch_size=2, chunk_size=2)
    assert abs(d1.total - d2.total) <= 1e-12 * abs(d1.total) and d2.n_samples == 7


def test_a_generator_is_read_once_and_reused() -> None:
    model, (x, y) = _mlp(), _xy(7)
    ref = nt.expected_entropic_force(model, nn.MSELoss(), (x, y), lr=0.1, batch_size=2, chunk_size=3)
    gen = ((x[i:i + 3], y[i:i + 3]) for i in range(0, 7, 3))  # needs two passes: ḡ, then forces
    got = nt.expected_entropic_force(model, nn.MSELoss(), gen, lr=0.1, batch_size=2, chunk_size=3)
    assert torch.allclose(_flat(ref.total), _flat(got.total), rtol=1e-10, atol=1e-14)


def test_gradient_noise_batches_of_a_loader() -> None:
    model, (x, y) = _mlp(), _xy(8)
    a = nt.gradient_noise(model, nn.MSELoss(), (x, y), batch_size=4)
    b = nt.gradient_noise(model, nn.MSELoss(), DataLoader(TensorDataset(x, y), batch_size=4))
    assert a.trace_sigma == pytest.approx(b.trace_sigma, rel=1e-12)
    with pytest.raises(ValueError, match="batch_size is required"):
        nt.gradient_noise(model, nn.MSELoss(), (x, y))


def test_train_and_monitor_with_keyword_inputs_and_model_loss() -> None:
    torch.manual_seed(0)
    model = KwModel().to(DT)
    x, y = _kw_data(8)
    mon = nt.ThermoMonitor(model, nt.model_loss, noise_every=1, symmetries=None)
    hist = nt.train(model, nt.model_loss, {**x, "labels": y}, lr=0.1, batch_size=4, steps=3,
                    monitor=mon)
    assert hist["entropic/trace_sigma"].shape == (3,)


def test_inputs_move_to_the_models_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model, (x, y) = _mlp(), _xy(6)
    ref = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    model.cuda()
    got = nt.per_sample_grad_norms(model, nn.MSELoss(), DataLoader(TensorDataset(x, y), batch_size=4))
    assert got.device.type == "cuda"
    assert torch.allclose(got.cpu(), ref, rtol=1e-10)


@pytest.mark.parametrize(
    ("data", "loss_fn", "exc", "match"),
    [
        (({"input_ids": torch.zeros(4, 5, dtype=torch.long), "position_ids": torch.zeros(1, 5)},
          torch.zeros(4)), nn.MSELoss(), ValueError, r"disagree on the batch size.*position_ids"),
        (DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 2)), batch_size=2),
         nn.MSELoss(), ValueError, "yielded no batches"),
        ([], nn.MSELoss(), ValueError, "yielded no batches"),
        (torch.zeros(4, 3), nn.MSELoss(), TypeError, "without targets.*model_loss"),
        ("text", nn.MSELoss(), TypeError, "must be a pair"),
        ((torch.zeros(4, 3), torch.zeros(3, 2)), nn.MSELoss(), ValueError,
         r"inputs: 4, targets: 3"),
        ((torch.full((4, 3), float("nan")), torch.zeros(4, 2)), nn.MSELoss(), ValueError, "NaN"),
    ],
    ids=["mapping-sizes", "empty-loader", "empty-list", "no-targets", "string", "pair-sizes", "nan"],
)
def test_bad_data(data, loss_fn, exc, match) -> None:
    with pytest.raises(exc, match=match):
        list(as_data(data, loss_fn))


def test_bad_losses() -> None:
    torch.manual_seed(0)
    model = KwModel().to(DT)
    x, _ = _kw_data()
    with pytest.raises(ValueError, match=r"without a loss \(loss=None\).*labels"):
        nt.entropic_loss(model, nt.model_loss, x, lr=0.1)  # no labels among the inputs

    class PerSample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x).squeeze(-1) ** 2  # per-sample losses, not their mean

    with pytest.raises(ValueError, match="scalar tensor"):
        nt.entropic_force(PerSample(), nt.model_loss, torch.randn(4, 3), lr=0.1)
    with pytest.raises(ValueError, match="num_data=9, but data holds 7"):
        nt.entropic_decomposition(_mlp(), nn.MSELoss(), _xy(7), lr=0.1, batch_size=2, num_data=9)


def test_pair_and_iterable_forms_are_told_apart() -> None:
    x, y = _xy(4)
    assert as_batch((x, y), nn.MSELoss()).size == 4
    d = as_data([(x, y), (x[:2], y[:2])], nn.MSELoss())
    assert [b.size for b in d] == [4, 2] and d.n_samples == 6
    # with the model's own loss a tuple of two tensors is two batches of inputs
    d_own = as_data((x, x[:3]), nt.model_loss)
    assert [b.size for b in d_own] == [4, 3] and all(b.targets is None for b in d_own)
