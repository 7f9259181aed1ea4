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
    """scikit-learn's 1,797 real 8×8 handwritten digits, pixels scaled to [0, 1]; targets int64.

    Args:
        dtype: the dtype of the inputs.
        flatten: ``(1797, 64)`` inputs; False: ``(1797, 1, 8, 8)`` images.

    Returns:
        ``(inputs, targets)``: pixels in [0, 1] and the digits 0–9 (int64).

    Raises:
        ImportError: scikit-learn is not installed (the ``experiments`` extra).

    Example:
        >>> from neurothermo.data import load_digits
        >>> x, y = load_digits()
        >>> tuple(x.shape), tuple(y.shape), float(x.max()), int(y.max())
        ((1797, 64), (1797,), 1.0, 9)
    """
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
    """MNIST from the standard IDX files in ``folder`` (plain or ``.gz``), pixels in [0, 1].

    Nothing is downloaded: put the four standard files (``train-images-idx3-ubyte``, …) there.

    Args:
        folder: the folder holding the IDX files.
        split: ``"train"`` or ``"test"`` (``t10k-*``).
        dtype: the dtype of the inputs.
        flatten: ``(N, 784)`` inputs; False: ``(N, 1, 28, 28)`` images.
        limit: keep the first ``limit`` samples; None: all.

    Returns:
        ``(inputs, targets)``: pixels ``/255`` and the labels (int64).

    Raises:
        ValueError: an unknown ``split``, a file that is not an unsigned-byte IDX file of the
            right dimensions (or truncated), different numbers of images and labels.
        FileNotFoundError: ``folder`` or one of its files does not exist.

    Example:
        >>> import pathlib, struct, tempfile
        >>> from neurothermo.data import read_mnist
        >>> folder = pathlib.Path(tempfile.mkdtemp())  # two 2×2 "images", written as IDX files
        >>> _ = (folder / "t10k-images-idx3-ubyte").write_bytes(
        ...     struct.pack(">HBBIII", 0, 8, 3, 2, 2, 2) + bytes([0, 255, 51, 102] * 2))
        >>> _ = (folder / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 8, 1, 2) + bytes([7, 3]))
        >>> x, y = read_mnist(folder, "test")
        >>> x[0].tolist(), y.tolist()
        ([0.0, 1.0, 0.20000000298023224, 0.4000000059604645], [7, 3])
    """
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
    positive definite (they are Cholesky-factored).

    Args:
        n: the number of samples.
        sigma_x: ``Σ_x``, ``(d_in, d_in)`` (its dtype is the samples' dtype).
        v: the teacher ``V``, ``(d_out, d_in)``, or a ``(d_in,)`` vector for one output.
        sigma_eps: ``Σ_ε``, ``(d_out, d_out)`` (a scalar or ``(1, 1)`` for one output).
        generator: the random source; None: torch's global one.

    Returns:
        ``(x, y)``: ``(n, d_in)`` inputs and ``(n, d_out)`` targets (``(n,)`` for a vector ``v``).

    Raises:
        torch.linalg.LinAlgError: a covariance that is not positive definite.
        RuntimeError: shapes that do not fit (propagated from torch).

    Example:
        >>> import torch
        >>> from neurothermo.data import linear_teacher
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = linear_teacher(20000, torch.eye(2), torch.tensor([1.0, -2.0]),
        ...                       torch.tensor(0.25), generator=g)
        >>> x.shape, y.shape
        (torch.Size([20000, 2]), torch.Size([20000]))
        >>> abs(float(y.var()) - (1 + 4 + 0.25)) < 0.2  # Var y = vᵀΣ_x v + Σ_ε
        True
    """
    v2 = v.reshape(1, -1) if v.ndim == 1 else v
    lx = torch.linalg.cholesky(sigma_x)
    le = torch.linalg.cholesky(sigma_eps.reshape(v2.shape[0], v2.shape[0]))
    x = torch.randn(n, sigma_x.shape[0], generator=generator, dtype=sigma_x.dtype) @ lx.T
    eps = torch.randn(n, v2.shape[0], generator=generator, dtype=sigma_x.dtype) @ le.T
    y = x @ v2.T + eps
    return x, (y.squeeze(1) if v.ndim == 1 else y)
