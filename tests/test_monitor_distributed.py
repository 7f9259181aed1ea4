"""The monitor under torch.distributed: 2 gloo ranks on CPU against one process on the global batches.

Each multi-process test starts 2 Python processes (~4 s CPU each for ``import torch``); the models
are tiny and train for 4 steps.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

import neurothermo as nt

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without the gloo backend")

# float64 throughout. DDP's all-reduce adds the two ranks' mean gradients in another order than one
# process's mean over 8 samples: each gradient entry differs by a few ulps (eps64 = 2.2e-16 relative),
# and 4 SGD steps with lr 0.05 carry that into the parameters (measured: they agree to 3e-17
# absolute after 4 steps). 1e-10 relative leaves a 10^5 margin over rounding, while every real error a missing
# reduction causes (local b = 4 for 8, half the per-sample norms, a rank's own loss) is O(10%) or
# more: the control below checks that the local half's columns differ by far more than this.
RTOL, ATOL = 1e-10, 1e-12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(mode: str, out: Path, world: int = 2, timeout: float = 120.0, ranks: int | None = None) -> None:
    """Start ``ranks`` processes (default ``world``) of tests/dist_worker.py and wait for them."""
    port = _free_port()
    src = str(Path(__file__).parents[1] / "src")
    procs = []
    for rank in range(world if ranks is None else ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        if ranks is not None:  # the framework starts the other ranks and sets their ranks itself
            del env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).parent / "dist_worker.py"),
                                       mode, str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"


def _compare(rows: list[dict[str, Any]], ref: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for got, want in zip(rows, ref):
        assert set(got) == set(want), set(got) ^ set(want)
        for k, v in want.items():
            a, b = np.asarray(got[k], dtype=np.float64), np.asarray(v, dtype=np.float64)
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"step {want['step']} {k}")


@pytest.fixture(scope="module")
def single() -> tuple[list[dict[str, Any]], torch.Tensor]:
    return W.run_single()


def test_ddp_two_ranks_give_the_single_process_columns_on_the_global_batch(
        tmp_path: Path, single: tuple[list[dict[str, Any]], torch.Tensor]) -> None:
    _launch("ddp", tmp_path)
    ref, ref_params = single
    h0, h1 = (torch.load(tmp_path / f"hist{r}.pt", weights_only=False) for r in (0, 1))
    torch.testing.assert_close(h0["params"], ref_params, rtol=RTOL, atol=ATOL)
    # the columns the noise steps add are there (per-sample norms gathered from both ranks)
    assert "entropic/trace_sigma" in ref[0] and "entropic/trace_sigma" in ref[2]
    assert any(k.startswith("charge/") for k in ref[0])
    _compare(h0["rows"], ref)
    _compare(h1["rows"], ref)  # every rank keeps the same history
    # rank 0 alone writes the rows
    assert not (tmp_path / "rank1.jsonl").exists()
    lines = [json.loads(s) for s in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert "__meta__" in lines[0]
    _compare(lines[1:], json.loads(json.dumps(nt.History.from_jsonl(
        tmp_path / "rank0.jsonl").to_dicts())))
    _compare(nt.History.from_jsonl(tmp_path / "rank0.jsonl").to_dicts(), ref)


def test_control_one_ranks_half_alone_differs_from_the_global_batch(
        single: tuple[list[dict[str, Any]], torch.Tensor]) -> None:
    """Without the reductions a rank would record its own half: the comparison above must see it."""
    ref, _ = single
    net = W.model()
    half = W.train(net, net, rank=0, world=2).history.to_dicts()  # rank 0's half, no process group
    for col in ("temperature", "loss", "entropic/trace_sigma"):
        a, b = float(half[0][col]), float(ref[0][col])
        assert abs(a - b) > 1e3 * (RTOL * abs(b) + ATOL), col


def test_lightning_ddp_two_ranks_give_the_single_process_columns(
        tmp_path: Path, single: tuple[list[dict[str, Any]], torch.Tensor]) -> None:
    """Lightning's ``ddp`` strategy starts rank 1 itself; the callback attaches the reductions."""
    pytest.importorskip("lightning")
    _launch("lightning_ddp", tmp_path, ranks=1, timeout=180.0)
    ref, ref_params = single
    for r in (0, 1):
        h = torch.load(tmp_path / f"hist{r}.pt", weights_only=False)
        torch.testing.assert_close(h["params"], ref_params, rtol=RTOL, atol=ATOL)
        _compare(h["rows"], ref)
    assert not (tmp_path / "rank1.jsonl").exists()
    _compare(nt.History.from_jsonl(tmp_path / "rank0.jsonl").to_dicts(), ref)


def test_fsdp2_two_ranks_give_the_single_process_columns(tmp_path: Path) -> None:
    """FSDP2 (``fully_shard`` per layer and at the root): parameters and gradients are sharded
    DTensors; gradient energies, balance and charges equal one process's on the global batches."""
    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
    _launch("fsdp", tmp_path)
    ref, ref_params = W.run_single(noise_every=None)
    assert any(k.startswith("charge/") for k in ref[0]) and "energy_in/sym0" in ref[0]
    for r in (0, 1):
        h = torch.load(tmp_path / f"hist{r}.pt", weights_only=False)
        torch.testing.assert_close(h["params"], ref_params, rtol=RTOL, atol=ATOL)
        _compare(h["rows"], ref)
    assert not (tmp_path / "rank1.jsonl").exists()


def test_sharded_models_refuse_what_needs_unsharded_passes() -> None:
    from neurothermo.monitor.distributed import check_sharded

    with pytest.raises(ValueError, match="before fully_shard and pass symmetries=syms"):
        check_sharded("auto", None, None)
    with pytest.raises(ValueError, match="noise_every=None and sharpness_every=None"):
        check_sharded(None, 10, None)
    check_sharded(None, None, None)


def test_hf_trainer_ddp_two_ranks_give_the_single_process_columns(tmp_path: Path) -> None:
    """The Trainer under DDP (2 ranks x 4 samples) against one process accumulating 2 x 4 samples:
    the Trainer hands both the same 8 samples per step, so the columns agree to float32 rounding
    (gradients summed in another order: ~1e-7 relative per entry; Tr Σ is a difference of sums of
    ~40k squared entries, 1e-4 of mean‖g_i‖² as in test_monitor_hf)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import test_monitor_hf as hf
    from neurothermo.monitor.hf import ThermoTrainerCallback

    _launch("hf_ddp", tmp_path, timeout=180.0)
    cb = ThermoTrainerCallback(noise_every=hf.NOISE_EVERY, symmetries=None)
    hf._train([cb], tmp_path / "single")  # 4 samples x 2 accumulated micro-batches
    assert cb.monitor is not None
    ref = cb.monitor.history
    for r in (0, 1):
        rows = torch.load(tmp_path / f"hist{r}.pt", weights_only=False)["rows"]
        assert [row["step"] for row in rows] == list(ref.steps("loss"))
        for row in rows:
            i = list(ref.steps("loss")).index(row["step"])
            assert row["batch_size"] == ref["batch_size"][i] == 8
            assert row["loss"] == pytest.approx(float(ref["loss"][i]), rel=1e-5)
            for c in [c for c in row if c.startswith("grad_sq/")]:
                assert row[c] == pytest.approx(float(ref[c][i]), rel=1e-4, abs=1e-12), c
            if "entropic/trace_sigma" in row:
                j = list(ref.steps("entropic/trace_sigma")).index(row["step"])
                assert row["entropic/trace_sigma"] == pytest.approx(
                    float(ref["entropic/trace_sigma"][j]), rel=1e-4), row["step"]
        assert sum("entropic/trace_sigma" in row for row in rows) == len(ref.steps("entropic/trace_sigma"))
