"""Every writer receives exactly the monitor's rows: JSONL, TensorBoard, W&B (offline), MLflow (file store)."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import neurothermo as nt
from neurothermo.monitor.writers import JSONLWriter


class _Tee:
    """Hands every row to several writers (the monitor takes one)."""

    def __init__(self, *writers: Any) -> None:
        self.writers = writers

    def write(self, rows: Any, meta: Any) -> None:
        for w in self.writers:
            w.write(rows, meta)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            getattr(w, "close", lambda: None)()


def _run(writer: Any, steps: int = 4) -> nt.ThermoMonitor:
    """Plain SGD on a ReLU MLP (a rescale symmetry: per-unit vectors and ``:`` in ratio names)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = x.sum(1, keepdim=True).sin()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    mon = nt.ThermoMonitor(model, nn.MSELoss(), noise_every=2, writer=writer, sync_every=2)
    nt.train(model, nn.MSELoss(), (x, y), lr=0.05, batch_size=8, steps=steps, monitor=mon)
    mon.close()
    return mon


def _scalar_columns(mon: nt.ThermoMonitor) -> list[str]:
    return [c for c in mon.history.columns if mon.history[c].ndim == 1]


def test_jsonl_writer_rows_equal_the_history(tmp_path: Path) -> None:
    mon = _run(JSONLWriter(tmp_path / "m.jsonl"))
    lines = [json.loads(s) for s in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert list(lines[0]) == ["__meta__"] and lines[0]["__meta__"]["layers"] == mon.history.meta["layers"]
    assert lines[1:] == json.loads(json.dumps(mon.history.to_dicts()))  # each row once, in order
    back = nt.History.from_jsonl(tmp_path / "m.jsonl")
    for c in mon.history.columns:
        np.testing.assert_array_equal(back[c], mon.history[c])


def test_tensorboard_writer_scalars_and_histograms(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = nt.TensorBoardWriter(tmp_path / "tb")
    mon = _run(tb)
    acc = EventAccumulator(str(tb.log_dir), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    h = mon.history
    for c in _scalar_columns(mon):
        ev = acc.Scalars(c)
        assert [e.step for e in ev] == list(h.steps(c)), c
        np.testing.assert_allclose([e.value for e in ev], h[c], rtol=1e-6, err_msg=c)  # float32 events
    vectors = [c for c in h.columns if h[c].ndim > 1]
    assert vectors and set(vectors) <= set(acc.Tags()["histograms"])
    c = vectors[0]
    last = acc.Histograms(c)[-1]
    assert last.step == h.steps(c)[-1]
    assert last.histogram_value.num == h[c][-1].size
    assert last.histogram_value.sum == pytest.approx(float(h[c][-1].sum()), rel=1e-6)


def _wandb_history(run_dir: Path) -> tuple[list[dict[str, Any]], bool]:
    """The logged rows of an offline run, read from its ``.wandb`` file (LevelDB log format:
    a 7-byte file header, then 32 KiB blocks of records with 7-byte headers: crc, length, type),
    and whether the run's exit record is there (the file is complete)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    block, off, buf, rows, done = 32768, 7, b"", [], False
    while off + 7 <= len(data):
        if block - off % block < 7:
            off += block - off % block
            continue
        _, n, kind = struct.unpack("<IHB", data[off:off + 7])
        off += 7
        if kind == 0 and n == 0:
            break
        buf, off = buf + data[off:off + n], off + n
        if kind in (1, 4):  # a full record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            done = done or r.WhichOneof("record_type") == "exit"
            if r.WhichOneof("record_type") == "history":  # dicts (histograms) come flattened: a/b/_type
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows, done


def test_wandb_writer_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from neurothermo.monitor.writers import WandbWriter

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    writer = WandbWriter(mode="offline", dir=str(tmp_path), project="neurothermo-test")
    mon = _run(writer)
    for _ in range(100):  # the wandb service may still be writing the file after finish()
        history, done = _wandb_history(Path(writer.run.dir).parent)
        if done:
            break
        time.sleep(0.2)
    rows = {int(r["_step"]): r for r in history}
    h = mon.history
    for c in _scalar_columns(mon):
        for s, v in zip(h.steps(c), h[c]):
            assert rows[int(s)][c] == pytest.approx(float(v), rel=1e-12, abs=0), (c, s)
    vectors = [c for c in h.columns if h[c].ndim == 2]
    assert vectors
    row = rows[int(h.steps(vectors[0])[-1])]
    assert row[vectors[0] + "/_type"] == "histogram"
    assert sum(row[vectors[0] + "/values"]) == h[vectors[0]][-1].size  # counts of every entry


def test_mlflow_writer_local_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from neurothermo.monitor.writers import MLflowWriter

    # MLflow 3 keeps the file store in maintenance mode and asks for this opt-in; a database
    # backend (sqlite) would need SQLAlchemy, which mlflow-skinny does not install.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    writer = MLflowWriter(tracking_uri=(tmp_path / "mlruns").as_uri(), experiment="neurothermo-test")
    mon = _run(writer)
    h = mon.history
    cols = _scalar_columns(mon)
    assert any(":" in c for c in cols)  # layer_ratio/a:b is renamed, not dropped
    for c in cols:
        got = sorted((m.step, m.value) for m in writer.client.get_metric_history(writer.run_id, MLflowWriter.key(c)))
        assert [s for s, _ in got] == list(h.steps(c)), c
        np.testing.assert_allclose([v for _, v in got], h[c], rtol=1e-15, err_msg=c)
    assert writer.client.get_run(writer.run_id).info.status == "FINISHED"


def test_writers_refuse_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match="needs a file path"):
        JSONLWriter(tmp_path)
    if pytest.importorskip("wandb"):
        from neurothermo.monitor.writers import WandbWriter

        with pytest.raises(ValueError, match="not both"):
            WandbWriter(run=object(), mode="offline")
