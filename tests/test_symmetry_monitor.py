"""ThermoMonitor(symmetries="auto") on models whose graph cannot be captured (wholly or in part),
and with approximate symmetries: warn and go on, never fail the run."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurothermo as nt
from neurothermo.monitor import names
from neurothermo.monitor.monitor import MonitorWarning
from neurothermo.monitor.symmetries import detect

D = torch.float64


class Hopeless(nn.Module):
    """Python control flow on a tensor value in the model's own forward, nothing to fall back to."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 1, dtype=D))

    def forward(self, x):
        if x.sum() > 0:
            return x @ self.w
        return -(x @ self.w)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(3, 3)

    def forward(self, x):
        return self.f(x) if x.sum() > 0 else x


class PartlyOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.g, self.h = Gate(), nn.Linear(3, 5), nn.Linear(5, 1)

    def forward(self, x):
        return self.h(F.relu(self.g(self.gate(x))))


def _run(model: nn.Module, steps: int = 3) -> nt.ThermoMonitor:
    g = torch.Generator().manual_seed(0)
    x, y = -torch.rand(24, 3, generator=g, dtype=D), torch.randn(24, 1, generator=g, dtype=D)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = nt.ThermoMonitor(model, F.mse_loss, optimizer=opt, noise_every=None)
    for step in range(steps):
        xb, yb = x[8 * step: 8 * step + 8], y[8 * step: 8 * step + 8]
        opt.zero_grad()
        loss = F.mse_loss(model(xb), yb)
        loss.backward()
        mon.after_backward(step, (xb, yb), loss=loss)
        opt.step()
        mon.after_step(step)
    return mon


def test_untraceable_model_warns_and_runs_without_symmetry_columns():
    torch.manual_seed(0)
    with pytest.warns(MonitorWarning, match="no symmetry columns.*Hopeless"):
        mon = _run(Hopeless())
    h = mon.history
    assert h.meta["symmetries"] == [] and len(h[names.LOSS]) == 3
    assert any("no symmetry columns" in n for n in h.meta["notes"])


def test_partly_opaque_model_warns_and_monitors_the_rest():
    torch.manual_seed(0)
    model = PartlyOpaque().double()
    with pytest.warns(MonitorWarning, match="'gate' not searched"):
        mon = _run(model)
    (sym,) = mon.history.meta["symmetries"]
    assert sym["kind"] == "rescale" and sym["location"].startswith("g ")
    assert len(mon.history[names.charge(0)]) == 3


def test_approximate_symmetries_are_monitored_with_their_breaking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MonitorWarning)  # nothing to warn about
        mon = _run(model)
    (scale,) = [s for s in mon.history.meta["symmetries"] if s["kind"] == "scale"]
    assert scale["exact"] is False and scale["broken_by"] == "eps=1e-05 of '1'"
    assert 0 < scale["breaking"] < 1e-2
    assert len(mon.history[names.charge(0)]) == 3


def test_detect_says_when_it_is_slow_and_accepts_keyword_inputs(monkeypatch):
    """Lines come through ``say`` once detection has taken ``after`` seconds (0 here, so that
    this small model counts as slow)."""
    from neurothermo.symmetry import progress

    init = progress.Progress.__init__
    monkeypatch.setattr(progress.Progress, "__init__",
                        lambda self, arg, what, after=1.0: init(self, arg, what, 0.0))
    torch.manual_seed(0)
    lines: list[str] = []

    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    syms = detect(KW().double(), {"x": torch.randn(12, 3, dtype=D)}, "auto", say=lines.append)
    assert sorted(s.kind for s in syms) == ["permutation", "rescale"]
    assert lines and all(line.startswith("detecting symmetries: find_symmetries: ") for line in lines)
    assert "capturing the graph" in lines[0] and "done" in lines[-1]


def test_progress_timer_prints_the_stage_in_progress():
    import time

    from neurothermo.symmetry.progress import Progress

    lines: list[str] = []
    p = Progress(lines.append, "find_symmetries", after=0.05)
    p("capturing the graph")  # fast so far: held back
    assert lines == []
    time.sleep(0.3)  # a slow stage: the timer says what is going on
    assert len(lines) == 1 and lines[0].startswith("find_symmetries: capturing the graph …")
    p.close("done")
    assert lines[-1].startswith("find_symmetries: done")
    quiet: list[str] = []
    q = Progress(quiet.append, "x", after=10.0)
    q("stage")
    q.close("done")
    assert quiet == []  # finished within the delay: nothing said
