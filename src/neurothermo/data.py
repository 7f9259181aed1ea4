"""Datasets that work offline: scikit-learn digits, MNIST from IDX files, synthetic teachers.

Every loader returns a pair ``(inputs, targets)`` of tensors, the ``data`` format of the whole API.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["linear_teacher", "load_digits", "read_mnist"]


def load_digits(dtype: torch.dtype = torch.float32, *, flatten: bool = True) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 real 8×8 handwritten digits, pixels scaled to [0, 1]; targets int64."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.as_tensor(d.data / 16.0, dtype=dtype)
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    return x, torch.as_tensor(d.target, dtype=torch.long)


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open_idx(folder: Path, stem: str) -> bytes:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        path = folder / name
        if path.exists():
            raw = path.read_bytes()
            return gzip.decompress(raw) if name.endswith(".gz") else raw
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found in {str(folder)!r}; put the four standard IDX files "
        f"({', '.join(f for pair in _MNIST_FILES.values() for f in pair)}) there"
    )


def _parse_idx(raw: bytes, expected_dims: int, what: str) -> np.ndarray:
    if len(raw) < 4:
        raise ValueError(f"{what}: file too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise ValueError(f"{what}: not an unsigned-byte IDX file with {expected_dims} dimensions")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{what}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{what}: header says {shape} but the file holds {body.size} bytes")
    return body.reshape(shape)


def read_mnist(folder: str | Path, split: str = "train", *, dtype: torch.dtype = torch.float32,
               flatten: bool = True, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """MNIST from the standard IDX files in ``folder`` (plain or ``.gz``), pixels in [0, 1]."""
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder {str(folder)!r} does not exist")
    img_stem, lab_stem = _MNIST_FILES[split]
    images = _parse_idx(_open_idx(folder, img_stem), 3, img_stem)
    labels = _parse_idx(_open_idx(folder, lab_stem), 1, lab_stem)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels in {folder}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.as_tensor(images.astype(np.float32) / 255.0, dtype=dtype)
    x = x.reshape(x.shape[0], -1) if flatten else x.unsqueeze(1)
    return x, torch.as_tensor(labels.astype(np.int64))


def linear_teacher(n: int, sigma_x: Tensor, v: Tensor, sigma_eps: Tensor, *,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, Σ_x)``, ``y = V x + ε`` with ``ε ~ N(0, Σ_ε)`` independent of x (docs/theory.md §2–§4).

    ``v`` is a matrix ``(d_out, d_in)`` or a vector (one output). Covariances must be symmetric
    positive semi-definite.
    """
    v2 = v.reshape(1, -1) if v.ndim == 1 else v
    lx = torch.linalg.cholesky(sigma_x)
    le = torch.linalg.cholesky(sigma_eps.reshape(v2.shape[0], v2.shape[0]))
    x = torch.randn(n, sigma_x.shape[0], generator=generator, dtype=sigma_x.dtype) @ lx.T
    eps = torch.randn(n, v2.shape[0], generator=generator, dtype=sigma_x.dtype) @ le.T
    y = x @ v2.T + eps
    return x, (y.squeeze(1) if v.ndim == 1 else y)
