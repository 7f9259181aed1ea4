from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from neurothermo.data import linear_teacher, load_digits, read_mnist


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool = False) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
def test_read_mnist_round_trip(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28))
    labels = rng.integers(0, 10, size=5)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", images, gz=gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels, gz=gz)
    x, y = read_mnist(tmp_path, "test")
    assert x.shape == (5, 784) and y.dtype == torch.long
    np.testing.assert_allclose(x.numpy(), images.reshape(5, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), labels)
    x2, _ = read_mnist(tmp_path, "test", flatten=False, limit=2)
    assert x2.shape == (2, 1, 28, 28)


def test_read_mnist_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_mnist(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        read_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" * 3)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(ValueError, match="header says"):
        read_mnist(tmp_path)
    with pytest.raises(ValueError, match="split"):
        read_mnist(tmp_path, "valid")


def test_load_digits() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64) and float(x.max()) == 1.0 and int(y.max()) == 9


def test_linear_teacher_moments() -> None:
    g = torch.Generator().manual_seed(0)
    sx = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    v = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.0, 0.5]], dtype=torch.float64)
    se = torch.diag(torch.tensor([1.0, 0.25], dtype=torch.float64))
    n = 200_000
    x, y = linear_teacher(n, sx, v, se, generator=g)
    resid = y - x @ v.T
    # sample covariances: entrywise standard error ≈ sqrt(2/n)·scale ≈ 3e-3·scale; 5 s.e. bounds
    torch.testing.assert_close(x.T @ x / n, sx, atol=5 * 2 * (2 / n) ** 0.5, rtol=0)
    torch.testing.assert_close(resid.T @ resid / n, se, atol=5 * (2 / n) ** 0.5, rtol=0)
    torch.testing.assert_close(x.T @ resid / n, torch.zeros(3, 2, dtype=torch.float64),
                               atol=5 * 2 * (1 / n) ** 0.5, rtol=0)
