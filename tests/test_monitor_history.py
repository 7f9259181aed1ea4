"""History: columnar storage, sparse columns, rows, JSONL round trip, checkpoint state."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from neurothermo.monitor.history import History


def _filled() -> History:
    h = History(meta={"layers": ["a", "b"]})
    for s in range(5):
        h.record(s, loss=torch.tensor(float(s)), vec=torch.arange(3.0) * s)
        if s % 2 == 0:
            h.record(s, sparse=10.0 * s)
    return h


def test_columns_values_and_steps() -> None:
    h = _filled()
    assert h.columns == ["loss", "vec", "sparse"]
    np.testing.assert_array_equal(h["loss"], np.arange(5.0))
    np.testing.assert_array_equal(h["vec"], np.outer(np.arange(5.0), np.arange(3.0)))
    np.testing.assert_array_equal(h.steps("sparse"), [0, 2, 4])
    np.testing.assert_array_equal(h["sparse"], [0.0, 20.0, 40.0])
    np.testing.assert_array_equal(h.last("vec"), [0.0, 4.0, 8.0])
    assert len(h) == 5 and "loss" in h and "nope" not in h


def test_values_stay_pending_until_read_then_one_chunk() -> None:
    h = History()
    for s in range(4):
        h.record(s, x=torch.tensor(float(s)))
    col = h._cols["x"]
    assert len(col.pending) == 4 and not col.chunks  # nothing copied yet
    h.flush()
    assert not col.pending and len(col.chunks) == 1
    h.record(4, x=torch.tensor(4.0))
    np.testing.assert_array_equal(h["x"], np.arange(5.0))


def test_mixed_dtypes_keep_order() -> None:
    h = History()
    h.record(0, x=torch.tensor(1.0, dtype=torch.float32))
    h.record(1, x=torch.tensor(2.0, dtype=torch.float64))
    h.record(2, x=3)
    np.testing.assert_array_equal(h["x"], [1.0, 2.0, 3.0])


def test_rows_hold_only_recorded_columns() -> None:
    rows = _filled().to_dicts()
    assert [r["step"] for r in rows] == list(range(5))
    assert rows[1] == {"step": 1, "loss": 1.0, "vec": [0.0, 1.0, 2.0]}
    assert rows[2]["sparse"] == 20.0
    assert [r["step"] for r in _filled().to_dicts(after_step=2)] == [3, 4]


def test_jsonl_round_trip_with_nonfinite(tmp_path) -> None:
    h = _filled()
    h.record(7, loss=math.nan, vec=[math.inf, -math.inf, 1.0])
    path = h.to_jsonl(tmp_path / "h.jsonl")
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"__meta__": {"layers": ["a", "b"]}}
    for line in lines:  # strict JSON: no bare NaN / Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    back = History.from_jsonl(path)
    assert back.meta == h.meta
    assert back.columns == h.columns
    for c in h.columns:
        np.testing.assert_array_equal(back.steps(c), h.steps(c))
        np.testing.assert_array_equal(back[c], h[c])


def test_truncate_and_state_dict_round_trip() -> None:
    h = _filled()
    buf = io.BytesIO()
    torch.save(h.state_dict(), buf)
    buf.seek(0)
    back = History()
    back.load_state_dict(torch.load(buf, weights_only=True))
    assert back.to_dicts() == h.to_dicts() and back.meta == h.meta
    back.truncate(2)
    assert [r["step"] for r in back.to_dicts()] == [0, 1, 2]
    back.record(3, loss=torch.tensor(9.0))  # recording continues after the truncation
    assert back["loss"][-1] == 9.0
    back.truncate(-1)
    assert back.columns == []


def test_bad_records() -> None:
    h = History()
    h.record(3, x=torch.zeros(2))
    with pytest.raises(ValueError, match="steps must increase"):
        h.record(3, x=torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        h.record(4, x=torch.zeros(3))
    with pytest.raises(TypeError, match="step must be an int"):
        h.record(4.0, x=torch.zeros(2))  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="no column 'y'"):
        h["y"]


def test_from_jsonl_bad_lines(tmp_path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"step": 0, "x": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        History.from_jsonl(p)
    p.write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="no 'step'"):
        History.from_jsonl(p)


def test_extend_appends_a_block_after_pending_records() -> None:
    h = History()
    h.record(0, x=torch.tensor([1.0, 2.0]))
    h.extend("x", [2, 5], torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    h.record(7, x=torch.tensor([7.0, 8.0]))
    np.testing.assert_array_equal(h.steps("x"), [0, 2, 5, 7])
    np.testing.assert_array_equal(h["x"], [[1, 2], [3, 4], [5, 6], [7, 8]])
    h.extend("y", [1], torch.tensor([9.0], dtype=torch.float16))  # half precision read as float32
    assert h["y"].dtype == np.float32 and [r["step"] for r in h.to_dicts()] == [0, 1, 2, 5, 7]


def test_bad_blocks() -> None:
    h = History()
    h.record(3, x=torch.zeros(2))
    with pytest.raises(ValueError, match="2 steps but 3 rows"):
        h.extend("x", [4, 5], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="increase strictly"):
        h.extend("x", [5, 5], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="already has step 3"):
        h.extend("x", [3, 4], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape"):
        h.extend("x", [4], torch.zeros(1, 3))
    np.testing.assert_array_equal(h.steps("x"), [3])  # nothing of a rejected block was kept
