"""Graph capture (fx → dynamo → block by block), keyword inputs, recurrent layers, GroupNorm
groups, approximate symmetries' Noether residual, progress lines."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurothermo.symmetry import find_symmetries
from neurothermo.symmetry.capture import split_inputs

D = torch.float64


class Net(nn.Module):
    """Conv → BN → ReLU → conv → GroupNorm → ReLU → pool → Linear → LayerNorm → GELU → Linear;
    with ``shape_branch`` a Python ``if`` on a shape (fx cannot trace it, dynamo can)."""

    def __init__(self, shape_branch: bool = False) -> None:
        super().__init__()
        self.shape_branch = shape_branch
        self.c1, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.c2, self.gn = nn.Conv2d(6, 8, 3), nn.GroupNorm(2, 8)
        self.fc1, self.ln, self.fc2 = nn.Linear(8, 10), nn.LayerNorm(10), nn.Linear(10, 3)

    def forward(self, x, scale=None):
        if self.shape_branch and x.shape[0] > 1000:
            x = x.flip(0)
        h = F.relu(self.bn(self.c1(x)))
        h = F.adaptive_avg_pool2d(F.relu(self.gn(self.c2(h))), 1).flatten(1)
        out = self.fc2(F.gelu(self.ln(self.fc1(h))))
        return out if scale is None else out * scale


def _summary(syms) -> list[tuple[str, str, int, bool]]:
    return sorted((s.kind, s.location.split()[0], s.n_units, s.exact) for s in syms)


def test_dynamo_capture_finds_what_fx_finds():
    """The same network through torch.fx and through torch.dynamo (fx fails on the shape test):
    module calls restored from F.conv2d / F.batch_norm / F.group_norm / F.linear / F.layer_norm
    give the same symmetries with the same parameter slices."""
    torch.manual_seed(0)
    plain, branchy = Net().to(D), Net(shape_branch=True).to(D)
    branchy.load_state_dict(plain.state_dict())
    x = torch.randn(5, 3, 8, 8, dtype=D)
    a = find_symmetries(plain, x, explain=True, progress=False)
    b = find_symmetries(branchy, x, explain=True, progress=False)
    assert [(blk.how, blk.status) for blk in a.blocks] == [("fx", "analysed")]
    assert [(blk.how, blk.status) for blk in b.blocks] == [("dynamo", "analysed")]
    assert "torch.fx failed" in b.blocks[0].reason
    assert _summary(a) == _summary(b) == sorted([
        ("scale", "c1", 6, False), ("rescale", "bn", 6, True), ("permutation", "c1", 6, True),
        ("scale", "c2", 2, False), ("rescale", "gn", 8, True), ("scale", "fc1", 1, False),
        ("permutation", "fc1", 10, True)])  # LayerNorm is permutation-equivariant; GELU no rescale
    assert [s.slices for s in a] == [s.slices for s in b]


def test_keyword_inputs_and_batch_encoding():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Net().to(D)
    x = torch.randn(4, 3, 8, 8, dtype=D)
    enc = transformers.BatchEncoding({"x": x, "scale": torch.tensor(2.0, dtype=D)})
    assert split_inputs(enc) == ((), {"x": x, "scale": enc["scale"]})
    report = find_symmetries(model, enc, explain=True, progress=False)
    assert report.blocks[0].how == "fx"  # the keywords are forward's first parameters, in order
    assert _summary(report) == _summary(find_symmetries(model, x, progress=False))

    class Kwargs(nn.Module):  # forward(**kwargs): only dynamo can bind them
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, **kw):
            return self.net(kw["x"], kw["scale"])

    report = find_symmetries(Kwargs(), enc, explain=True, progress=False)
    assert report.blocks[0].how == "dynamo"
    assert [(s.kind, s.location.replace("net.", "")) for s in report] == [
        (s.kind, s.location) for s in find_symmetries(model, x, progress=False)]
    with pytest.raises(TypeError, match="mapping of tensors"):
        find_symmetries(model, [1, 2])
    with pytest.raises(TypeError, match="mapping must hold tensors"):
        find_symmetries(model, {"x": 1})


def _rnn_change(model, sym, x, gen) -> float:
    moved = copy.deepcopy(model)
    sym.transform(moved, sym.random_element(gen, dtype=D))
    with torch.no_grad():
        ref, out = model(x), moved(x)
    return float((out - ref).norm() / ref.norm())


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], **kw) -> None:
        super().__init__()
        self.rnn = cell(4, 6, batch_first=True, **kw)
        self.head = nn.Linear(6 * (2 if kw.get("bidirectional") else 1), 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize(("cell", "kw", "expected"), [
    (nn.LSTM, {"num_layers": 2}, ["permutation", "permutation", "sign_flip", "sign_flip"]),
    (nn.GRU, {"num_layers": 2}, ["permutation", "permutation", "sign_flip", "sign_flip"]),
    (nn.RNN, {}, ["permutation", "sign_flip"]),
    (nn.RNN, {"nonlinearity": "relu"}, ["permutation"]),  # ReLU is not odd
    (nn.GRU, {"num_layers": 2, "dropout": 0.5}, ["sign_flip", "sign_flip"]),  # masks fixed by position
])
def test_recurrent_symmetries_hold_and_no_others(cell, kw, expected):
    torch.manual_seed(0)
    model = Recurrent(cell, **kw).to(D)
    x = torch.randn(3, 5, 4, dtype=D)
    syms = find_symmetries(model, x, progress=False)
    assert sorted(s.kind for s in syms) == expected
    gen = torch.Generator().manual_seed(1)
    for s in syms:  # dropout in train mode: compare with the same masks
        with torch.random.fork_rng():
            torch.manual_seed(0)
            assert _rnn_change(model.eval(), s, x, gen) <= 1e-12, str(s)
        model.train()


def test_lstm_sign_flip_without_the_cell_gate_is_no_symmetry():
    """Control: flipping the input/forget/output-gate rows instead of the cell-gate rows breaks it."""
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM).to(D)
    x = torch.randn(3, 5, 4, dtype=D)
    (sign,) = [s for s in find_symmetries(model, x) if s.kind == "sign_flip"]
    wrong = type(sign)(sign.kind, sign.location, tuple(
        type(s)(s.name, s.role, s.dim, 0, 6) if s.start == 12 else s for s in sign.slices),
        sign.n_units)
    assert _rnn_change(model, wrong, x, torch.Generator().manual_seed(1)) > 1e-2


def test_bidirectional_lstm_is_reported_opaque():
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM, bidirectional=True).to(D)
    report = find_symmetries(model, torch.randn(3, 5, 4, dtype=D), explain=True)
    assert not [s for s in report if "rnn" in s.location]
    assert any("bidirectional" in r.reason and "opaque" in r.reason for r in report.rejected)


def test_group_scale_charge_is_per_group():
    torch.manual_seed(0)
    model = Net().to(D)
    (sc,) = [s for s in find_symmetries(model, torch.randn(4, 3, 8, 8, dtype=D)) if s.location.startswith("c2")]
    w, b = model.c2.weight.detach(), model.c2.bias.detach()
    ref = (w.reshape(2, -1).pow(2).sum(1) + b.reshape(2, 4).pow(2).sum(1))
    torch.testing.assert_close(sc.charge(model), ref, rtol=1e-13, atol=0)


def _noether_residual(model, sym, x) -> torch.Tensor:
    """``⟨Aθ, ∇L⟩`` per unit: d/dt of a random scalar of the outputs along the group's flow;
    zero for an exact symmetry, the breaking term of dJ/dt for an approximate one."""
    model.zero_grad()
    (model(x) * torch.linspace(-1, 1, 3, dtype=D)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return sum((s.matrix(model.get_parameter(s.name).detach(), sym.n_units)
                * s.matrix(grads[s.name], sym.n_units)).sum(1) for s in sym.slices if s.role == "in")


def test_approximate_scale_has_a_noether_residual_that_vanishes_with_eps():
    torch.manual_seed(0)
    model, x = Net().to(D), torch.randn(6, 3, 8, 8, dtype=D)
    approx = [s for s in find_symmetries(model, x) if not s.exact]
    assert {s.location.split()[0] for s in approx} == {"c1", "c2", "fc1"}
    for s in approx:
        assert s.breaking > 1e-12 and s.broken_by.startswith("eps=1e-05")
        r = _noether_residual(model, s, x)
        exact = copy.deepcopy(model)
        for m in exact.modules():
            if hasattr(m, "eps"):
                m.eps = torch.finfo(D).tiny
        r0 = _noether_residual(exact, s, x)
        scale = float(s.charge(model).abs().max())
        assert float(r.abs().max()) > 1e-9 * scale and float(r0.abs().max()) < 1e-12 * scale, str(s)


def test_progress_lines(capsys):
    torch.manual_seed(0)
    model, x = Net().to(D), torch.randn(2, 3, 8, 8, dtype=D)
    find_symmetries(model, x)  # default: silent when done within a second
    assert capsys.readouterr().err == ""
    find_symmetries(model, x, progress=True)
    err = capsys.readouterr().err
    assert "find_symmetries: capturing the graph" in err and "verifying" in err and "done" in err
    lines: list[str] = []
    find_symmetries(model, x, progress=lines.append)
    assert capsys.readouterr().err == "" and lines == []  # a callable gets lines after 1 s only
    with pytest.raises(TypeError, match="progress"):
        find_symmetries(model, x, progress="yes")  # type: ignore[arg-type]
