"""find_symmetries through a fused projection split into sections of different sizes (Mamba's
``x_proj`` → ``split([dt_rank, state, state])``): the low-rank time step ``dt = W_dt·(x_proj x)[:r]``
is two linear maps in a row, a GL(r) double rotation of ``x_proj``'s first ``r`` rows against
``dt_proj``'s columns."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neurothermo as nt
from _helpers import rel_change as _rel

D = torch.float64
R, N = 4, 3


class LowRankStep(nn.Module):
    """``x_proj`` split unevenly into ``[dt (R), b (N), c (N)]``; ``dt`` goes through ``W @ dtᵀ``
    (a parameter on the left, as in Mamba) unless ``act`` puts a softplus first (the control:
    no rotation, only a permutation of the ``R`` units)."""

    def __init__(self, act: bool = False) -> None:
        super().__init__()
        self.x_proj = nn.Linear(8, R + 2 * N, bias=False)
        self.w = nn.Parameter(torch.randn(6, R))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt, b, c = torch.split(self.x_proj(x), [R, N, N], dim=-1)
        if self.act:
            dt = nn.functional.softplus(dt)
        y = (self.w @ dt.transpose(1, 2)).transpose(1, 2)  # [batch, T, 6]
        return torch.tanh(y) * (b * c).sum(-1, keepdim=True)


def _rotate(m: nn.Module, x_rows: torch.Tensor, w: torch.Tensor, g: torch.Generator) -> None:
    """``x_rows`` (the first R rows) → ``M·x_rows``, ``w`` (columns) → ``w·M⁻¹``."""
    a = torch.eye(R, dtype=D) + torch.randn(R, R, generator=g, dtype=D)
    with torch.no_grad():
        x_rows.copy_(a @ x_rows)
        w.copy_(w @ torch.linalg.inv(a))


def test_uneven_split_gives_the_low_rank_rotation():
    torch.manual_seed(0)
    model, x = LowRankStep().to(D), torch.randn(3, 5, 8, dtype=D)
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    rot = [s for s in report if s.kind == "double_rotation"]
    assert len(rot) == 1 and rot[0].n_units == R, str(report)
    assert {(s.name, s.role, s.dim, s.start, s.stop) for s in rot[0].slices} == {
        ("x_proj.weight", "in", 0, 0, R), ("w", "out", 1, 0, None)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ref = model(x)
        for _ in range(3):
            m = copy.deepcopy(model)
            _rotate(m, m.x_proj.weight[:R], m.w, g)
            assert _rel(m(x), ref) <= 1e-12


def test_uneven_split_after_a_nonlinearity_is_not_a_rotation():
    torch.manual_seed(0)
    model, x = LowRankStep(act=True).to(D), torch.randn(3, 5, 8, dtype=D)
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    assert not [s for s in report if s.kind == "double_rotation"], str(report)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        m = copy.deepcopy(model)
        _rotate(m, m.x_proj.weight[:R], m.w, g)
        assert _rel(m(x), model(x)) > 1e-4


def test_mamba_dt_rank_rotation():
    t = pytest.importorskip("transformers")
    cfg = t.MambaConfig(vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=2,
                        expand=2, conv_kernel=3, time_step_rank=R, use_mambapy=False)
    torch.manual_seed(0)
    model = t.MambaModel(cfg).to(D).eval()
    ids = torch.randint(3, 32, (4, 6), generator=torch.Generator().manual_seed(11))
    report = nt.find_symmetries(model, {"input_ids": ids}, explain=True, progress=False)
    g = torch.Generator().manual_seed(3)

    def out(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids, use_cache=False).last_hidden_state

    ref = out(model)
    for layer in range(2):
        p = f"layers.{layer}.mixer."
        rot = [s for s in report if s.kind == "double_rotation" and s.location.startswith(p)]
        assert len(rot) == 1, str(report)
        assert {(s.name, s.role, s.start, s.stop) for s in rot[0].slices} == {
            (p + "x_proj.weight", "in", 0, R), (p + "dt_proj.weight", "out", 0, None)}
        m = copy.deepcopy(model)
        mix = m.layers[layer].mixer  # type: ignore[index]
        _rotate(m, mix.x_proj.weight[:R], mix.dt_proj.weight, g)
        assert _rel(out(m), ref) <= 1e-12
        m = copy.deepcopy(model)  # control: x_proj's dt rows alone
        with torch.no_grad():
            m.layers[layer].mixer.x_proj.weight[:R] *= 3.0  # type: ignore[index]
        assert _rel(out(m), ref) > 1e-6
