"""Resume is exact, also for the monitor's history; damaged checkpoints and changed inputs refused.

The model has Dropout and trains with momentum on purpose: Dropout makes any extra pass of the
monitor draw other masks than the loop's (so a resume that measured the noise terms differently
from the uninterrupted run shows up as different numbers), and momentum makes the monitor write a
note (which must not be duplicated by a resume).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from neurothermo import ThermoMonitor, train
from neurothermo.monitor.history import History

SRC = str(Path(__file__).resolve().parents[1] / "src")
STEPS, NOISE_EVERY, CKPT_EVERY = 200, 25, 40


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _train(out: Path | None, *, resume: bool = False, callbacks=(), model=None, data=None
           ) -> tuple[History, nn.Module]:
    model = model or _model()
    mon = ThermoMonitor(model, nn.CrossEntropyLoss(), noise_every=NOISE_EVERY)
    hist = train(model, nn.CrossEntropyLoss(), data or _data(), optimizer="momentum", momentum=0.5,
                 lr=0.05, batch_size=16, steps=STEPS, monitor=mon, seed=3,
                 checkpoint_every=CKPT_EVERY if out else None, out=out, resume=resume,
                 callbacks=callbacks)
    return hist, model


def _assert_same(h1: History, m1: nn.Module, h2: History, m2: nn.Module) -> None:
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n
    assert sorted(h1.columns) == sorted(h2.columns)
    for c in h1.columns:
        a = torch.as_tensor(h1[c], dtype=torch.float64)
        b = torch.as_tensor(h2[c], dtype=torch.float64)
        assert torch.equal(torch.nan_to_num(a, nan=-1.25), torch.nan_to_num(b, nan=-1.25)), c
        assert torch.equal(torch.as_tensor(h1.steps(c)), torch.as_tensor(h2.steps(c))), c
    notes1, notes2 = h1.meta["notes"], h2.meta["notes"]
    assert notes1 == notes2 and len(notes2) == len(set(notes2))  # no note duplicated by a resume


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_after_an_interrupt_is_exact_for_parameters_and_history(tmp_path: Path) -> None:
    h_full, m_full = _train(tmp_path / "full")

    def stop(step: int, model: nn.Module, loss: torch.Tensor) -> None:
        if step == 137:  # between the checkpoints at 120 and 160, after the noise step at 125
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", callbacks=[stop])
    h_res, m_res = _train(tmp_path / "cut", resume=True)
    _assert_same(h_full, m_full, h_res, m_res)


CHILD = textwrap.dedent("""
    import sys, time, warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, sys.argv[2])
    import test_reliability_train as t
    from pathlib import Path
    def slow(step, model, loss):
        if step >= 100:
            Path(sys.argv[3]).write_text(str(step))
            time.sleep(0.02)
    t._train(Path(sys.argv[1]), callbacks=[slow])
""")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sigkill_mid_training_then_resume_is_exact(tmp_path: Path) -> None:
    out, marker = tmp_path / "killed", tmp_path / "step"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(Path(__file__).parent),
                             str(marker)], env=env)
    deadline = time.monotonic() + 180
    while not (marker.exists() and marker.read_text() and int(marker.read_text()) >= 143):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no handler runs: only the checkpoint at 120 survives
    proc.wait(timeout=60)
    assert (out / "checkpoint.pt").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no torn checkpoint left beside
    h_res, m_res = _train(out, resume=True)
    h_full, m_full = _train(tmp_path / "full")
    _assert_same(h_full, m_full, h_res, m_res)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_truncated_checkpoint_names_the_file_and_the_damage(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(out)
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"checkpoint\.pt \(1000 bytes\) is damaged or truncated"):
        _train(out, resume=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_with_other_data_or_model_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"

    def stop(step: int, model: nn.Module, loss: torch.Tensor) -> None:
        if step == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(out, callbacks=[stop])
    x, y = _data()
    other = (x.flip(0), y.flip(0))  # the same size, shapes and values, in another order
    with pytest.raises(ValueError, match="other training data"):
        _train(out, resume=True, data=other)
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(10, 17), nn.ReLU(), nn.Dropout(0.2), nn.Linear(17, 3))
    with pytest.raises(ValueError, match="a model of another structure"):
        _train(out, resume=True, model=wider)
    _train(out, resume=True)  # the same inputs resume fine
