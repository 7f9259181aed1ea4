"""Padding rows of embeddings in second-order measurements: frozen only when nothing else uses them.

An ``nn.Embedding(padding_idx=p)`` sets row ``p``'s gradient to zero, so that row never trains and
the Hessian is taken over the trainable entries, ``P H P``. A weight tied to an output head (BART,
Whisper: ``lm_head.weight is embed.weight``) trains in that row through the head: masking it made
``hvp`` and ``entropic_force`` wrong by the row's share (6 % and 3 % on a tiny BART), silently.
References: ``torch.autograd.functional.hvp`` of the mean loss (float64), and the masked operator
``P H P`` for the control.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurothermo as nt
from neurothermo._state import frozen_rows

DT = torch.float64
V, D, PAD = 12, 6, 1


class LM(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D, padding_idx=PAD)
        self.mix = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.embed(tokens))))


def ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, V), t.reshape(-1))


def _setup(tied: bool, with_pad: bool = False):
    torch.manual_seed(0)
    model = LM(tied).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, V, (5, 4), generator=g)  # no pad token ...
    if with_pad:
        x[0, :2] = PAD  # ... unless asked for
    y = torch.randint(0, V, (5, 4), generator=g)
    return model, x, y


def _ref_hvp(model: nn.Module, x, y, vs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    ps = tuple(p.detach() for _, p in model.named_parameters())

    def f(*flat):
        return ce(torch.func.functional_call(model, dict(zip(names, flat)), (x,)), y)

    _, hv = torch.autograd.functional.hvp(f, ps, tuple(vs[n] for n in names))
    return dict(zip(names, hv))


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in d.values()])


def test_a_tied_padding_row_trains_and_is_not_masked() -> None:
    model, x, y = _setup(tied=True)
    assert frozen_rows(model) == {}
    g = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}
    ref = _ref_hvp(model, x, y, v)
    assert float(ref["embed.weight"][PAD].norm()) > 1e-3  # the row's share is real
    got = nt.hvp(model, ce, (x, y), v)
    torch.testing.assert_close(_flat(got), _flat(ref), rtol=1e-10, atol=1e-14)
    grad = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(
        ce(model(x), y), list(model.parameters()))))
    force = nt.entropic_force(model, ce, (x, y), lr=0.1)  # −(lr/2) H g
    ref_force = {n: -0.05 * t for n, t in _ref_hvp(model, x, y, grad).items()}
    torch.testing.assert_close(_flat(force), _flat(ref_force), rtol=1e-10, atol=1e-14)


def test_control_an_untied_padding_row_stays_frozen() -> None:
    """Without the tie the row never trains: the operator is P H P, its row zero, and with pad
    tokens in the input (where H and the masked gradient's Jacobian differ) still symmetric."""
    model, x, y = _setup(tied=False, with_pad=True)
    assert frozen_rows(model) == {"embed.weight": PAD}
    g = torch.Generator().manual_seed(2)
    u = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}
    w = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}
    hu, hw = nt.hvp(model, ce, (x, y), u), nt.hvp(model, ce, (x, y), w)
    assert float(hu["embed.weight"][PAD].abs().max()) == 0.0
    mask = {n: torch.ones_like(t) for n, t in u.items()}
    mask["embed.weight"][PAD] = 0
    pu = {n: u[n] * mask[n] for n in u}
    ref = _ref_hvp(model, x, y, pu)
    torch.testing.assert_close(_flat(hu), _flat({n: ref[n] * mask[n] for n in ref}),
                               rtol=1e-10, atol=1e-14)
    lhs, rhs = float((_flat(w) * _flat(hu)).sum()), float((_flat(u) * _flat(hw)).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)  # wᵀ(PHP)u = uᵀ(PHP)w


def test_an_embedding_tied_to_one_with_another_padding_idx_is_not_frozen() -> None:
    emb = nn.Embedding(V, D, padding_idx=PAD)
    other = nn.Embedding(V, D, padding_idx=0)
    other.weight = emb.weight
    assert frozen_rows(nn.ModuleDict({"a": emb, "b": other})) == {}
    same = nn.Embedding(V, D, padding_idx=PAD)
    same.weight = emb.weight  # encoder and decoder sharing one table, one padding_idx
    assert frozen_rows(nn.ModuleDict({"a": emb, "b": same})) == {"a.weight": PAD}


# ------------------------------------------------------------------- weight normalisation
class WNNet(nn.Module):
    """A conv with weight normalisation (Wav2Vec2's positional convolution), as a
    parametrization (``legacy=False``) or with the older hook, then a head."""

    def __init__(self, legacy: bool) -> None:
        super().__init__()
        conv = nn.Conv1d(3, 4, 3, padding=1)
        wn = nn.utils.weight_norm if legacy else nn.utils.parametrizations.weight_norm
        self.conv = wn(conv, dim=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).mean(-1))


def _wn_reference(model: WNNet, x, y, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """H v with weight normalisation written out by hand, ``w = g · v / ‖v‖`` (norm over every
    axis but 2): twice-differentiable elementary ops, an independent forward."""
    names = [n for n, _ in model.named_parameters()]
    gname = next(n for n in names if n.endswith(("original0", "weight_g")))
    vname = next(n for n in names if n.endswith(("original1", "weight_v")))

    def f(*flat):
        p = dict(zip(names, flat))
        wv, wg = p[vname], p[gname]
        w = wv * (wg / wv.square().sum((0, 1), keepdim=True).sqrt())
        h = torch.tanh(F.conv1d(x, w, p["conv.bias"], padding=1)).mean(-1)
        return F.mse_loss(F.linear(h, p["head.weight"], p["head.bias"]), y)

    ps = tuple(p.detach() for _, p in model.named_parameters())
    _, hv = torch.autograd.functional.hvp(f, ps, tuple(v[n] for n in names))
    return dict(zip(names, hv))


@pytest.mark.parametrize("legacy", [False, True])
def test_second_order_through_weight_norm_is_exact(legacy: bool) -> None:
    """torch 2.13's fused ``_weight_norm`` has a wrong second derivative (gradgradcheck fails):
    plain double backward through it misses the hand-written reference (the control), while
    ``nt.hvp``, computed with the composite form, matches it to round-off."""
    torch.manual_seed(0)
    model = WNNet(legacy).to(DT)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 6, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)
    v = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}
    ref = _wn_reference(model, x, y, v)
    got = nt.hvp(model, nn.MSELoss(), (x, y), v)
    torch.testing.assert_close(_flat(got), _flat(ref), rtol=1e-10, atol=1e-14)
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.MSELoss()(model(x), y), params, create_graph=True)
    plain = torch.autograd.grad(grads, params, grad_outputs=[v[n] for n, _ in
                                                              model.named_parameters()])
    err = float((_flat(dict(enumerate(plain))) - _flat(ref)).norm() / _flat(ref).norm())
    assert err > 1e-6  # torch's own double backward through _weight_norm (the bug worked around)
    force = nt.entropic_force(model, nn.MSELoss(), (x, y), lr=0.1)
    grad = {n: gr.detach() for (n, _), gr in zip(model.named_parameters(), grads)}
    ref_force = {n: -0.05 * t for n, t in _wn_reference(model, x, y, grad).items()}
    torch.testing.assert_close(_flat(force), _flat(ref_force), rtol=1e-10, atol=1e-14)
    assert torch._weight_norm is not None and "composite" not in torch._weight_norm.__name__
