"""Recurrent rules (LSTM, GRU, RNN) against the per-sample loop, float64, every configuration
torch offers that the rule covers: layers, bidirectional, batch_first or not, initial states,
no biases, relu cells, frozen parameters; the refusals name the way out."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from _helpers import DT, assert_matches_naive
from foreign_models import devices
from neurothermo.gradstats import FallbackWarning, per_sample_grad_norms


class Head(nn.Module):
    """A recurrent layer, then a Linear on every step's output (all steps reach the loss)."""

    def __init__(self, rnn: nn.RNNBase, with_state: bool = False) -> None:
        super().__init__()
        self.rnn = rnn
        self.with_state = with_state
        d = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(d, 3)
        n = rnn.num_layers * (2 if rnn.bidirectional else 1)
        self.h0 = nn.Linear(2, n * rnn.hidden_size)  # a learned, per-sample initial state

    def forward(self, x: Tensor) -> Tensor:  # x: [b, T, 4]; seq-first RNNs get [T, b, 4]
        hx = None
        if self.with_state:
            n, hid = self.h0.out_features // self.rnn.hidden_size, self.rnn.hidden_size
            h = torch.tanh(self.h0(x[:, 0, :2])).reshape(-1, n, hid).transpose(0, 1).contiguous()
            hx = (h, 0.5 * h) if isinstance(self.rnn, nn.LSTM) else h
        out, _ = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1), hx)
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return self.head(out).mean(1)


CONFIGS = {
    "lstm": lambda: nn.LSTM(4, 5, batch_first=True),
    "lstm-2layer-bidir": lambda: nn.LSTM(4, 5, num_layers=2, bidirectional=True,
                                         batch_first=True),
    "lstm-seq-first-nobias": lambda: nn.LSTM(4, 5, bias=False),
    "gru": lambda: nn.GRU(4, 5, batch_first=True),
    "gru-2layer-bidir-seq-first": lambda: nn.GRU(4, 5, num_layers=2, bidirectional=True),
    "gru-nobias": lambda: nn.GRU(4, 5, bias=False, batch_first=True),
    "rnn-tanh-2layer": lambda: nn.RNN(4, 5, num_layers=2, batch_first=True),
    "rnn-relu-bidir": lambda: nn.RNN(4, 5, nonlinearity="relu", bidirectional=True,
                                     batch_first=True),
}


def data(rnn: nn.RNNBase, device: str, b: int = 5, t: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, 4, generator=g, dtype=DT)
    return x.to(device), torch.randn(b, 3, generator=g, dtype=DT).to(device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_recurrent_matches_the_loop(name: str, with_state: bool, device: str) -> None:
    torch.manual_seed(0)
    rnn = CONFIGS[name]()
    model = Head(rnn, with_state).to(device=device, dtype=DT)
    x, y = data(rnn, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        assert_matches_naive(model, nn.MSELoss(), x, y)


def test_frozen_recurrent_weights_and_inter_layer_dropout_in_eval() -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(4, 5, num_layers=2, dropout=0.5, batch_first=True)  # eval: no dropout
    model = Head(rnn).to(DT).eval()
    rnn.weight_hh_l0.requires_grad_(False)
    rnn.bias_ih_l1.requires_grad_(False)
    x, y = data(rnn, "cpu")
    assert_matches_naive(model, nn.MSELoss(), x, y)


def test_recurrent_output_unchanged_while_recording() -> None:
    # The recording forward (projection + fused kernel with identity input weight) computes the
    # module's own recurrence: same outputs and final states to rounding.
    from neurothermo.gradstats._capture import Recorder, recording

    torch.manual_seed(0)
    for name, make in CONFIGS.items():
        rnn = make().to(DT)
        x, _ = data(rnn, "cpu")
        x = x if rnn.batch_first else x.transpose(0, 1)
        ref = rnn(x)
        rec = Recorder(5, frozenset(id(p) for p in rnn.parameters()), clone=False,
                       create_graph=False)
        with recording(rnn, rec):
            got = rnn(x)
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_projected_lstm_uses_the_exact_fallback() -> None:
    # proj_size > 0 has no closed form here; torch.func's vmap cannot batch the projected LSTM
    # (in-place ops on its internal state), so the fallback runs one sample at a time: exact.
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(4, 5, proj_size=3, batch_first=True), Last(),
                          nn.Linear(3, 3)).to(DT)
    x, y = data(model[0], "cpu")
    with pytest.warns(FallbackWarning, match="'0' \\(LSTM\\)"):
        assert_matches_naive(model, nn.MSELoss(), x, y)


class Last(nn.Module):
    def forward(self, out: tuple[Tensor, object]) -> Tensor:
        return out[0][:, -1]


def test_packed_sequence_is_refused_with_the_way_out() -> None:
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            lengths = torch.full((x.shape[0],), x.shape[1])
            _, h = self.rnn(pack_padded_sequence(x, lengths, batch_first=True))
            return self.head(h[-1])

    x, y = torch.randn(4, 6, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="PackedSequence.*padded batch-first tensor"):
        per_sample_grad_norms(Packed().to(DT), nn.MSELoss(), (x, y))
