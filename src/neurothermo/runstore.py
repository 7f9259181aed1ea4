"""The run folder: every file written atomically, metrics streamed, status always readable.

Layout of one run (``<root>/<experiment>/<timestamp>-<id>/``)::

    config.json     the settings actually used (preset + overrides)
    env.json        package and torch versions, seed, git commit (when available), machine
    metrics.jsonl   one JSON object per line, streamed while the experiment runs
    summary.json    final figures and every checked theory prediction
    status          one word: running | done | failed | interrupted
    traceback.txt   only for failed runs
    *.png           figures

Atomicity: each file is written to a temporary file in the same folder and renamed over the target
(``os.replace``), so a reader, or a run killed at any instant, sees either the old or the new
complete file, never a torn one. ``metrics.jsonl`` is buffered in memory and appended at most every
``flush_seconds`` and at the end (including on Ctrl-C, SIGTERM and on failure): each flush writes only
the new lines, and a failed write is rolled back to the last complete line (:meth:`Run.flush`).

Reading is defensive: a run folder is untrusted input (it may be damaged, truncated or written by
someone else). :func:`read_summary` raises :class:`RunReadError` naming the folder and what is wrong
instead of a parser's traceback.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

STATUSES = ("running", "done", "failed", "interrupted")


class RunStoreError(OSError):
    """The output folder cannot be used."""


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np
        import torch
    except ImportError:  # pragma: no cover
        np = torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    if np is not None and isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _clean(obj: Any) -> Any:
    """Replace non-finite floats by strings so the JSON stays standard ("nan", "inf")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """JSON text of ``obj``; tensors/arrays become lists, non-finite floats become strings."""
    obj = json.loads(json.dumps(obj, default=_json_default))
    return json.dumps(_clean(obj), allow_nan=False, **kw)


@contextmanager
def _replacing(path: Path, mode: str) -> Iterator[IO[Any]]:
    """A new file in ``path``'s folder, open in ``mode``; on a clean exit it is flushed, fsynced and
    renamed over ``path`` (atomic), on an exception it is removed and ``path`` is left as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and a rename."""
    with _replacing(Path(path), "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically, see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable(root: Path | str) -> Path:
    """Create ``root`` if needed and prove it is writable, before any work is done."""
    if not str(root).strip():
        raise RunStoreError("output folder is empty (--out \"\"); give a folder, e.g. --out runs")
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-", delete=True):
            pass
    except OSError as exc:
        raise RunStoreError(
            f"output folder {str(root)!r} is not writable ({exc.strerror or exc}); "
            "choose another with --out DIR"
        ) from None
    return root


def git_commit(cwd: Path | None = None) -> str | None:
    """The current git commit of the source tree, or None when unavailable."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(seed: int) -> dict[str, Any]:
    """What produced a run: versions, seed, commit and machine."""
    import numpy
    import torch

    from neurothermo._version import __version__

    return {
        "neurothermo": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "seed": seed,
        "git_commit": git_commit(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class Run:
    """One run folder. Use :meth:`create`; write with the methods, never by hand."""

    def __init__(self, path: Path, flush_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self._pending: list[str] = []
        self._last_flush = time.monotonic()

    @classmethod
    def create(cls, root: Path, experiment: str, **kw: Any) -> Run:
        root = check_writable(Path(root))
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = root / experiment / f"{stamp}-{secrets.token_hex(3)}"
        path.mkdir(parents=True, exist_ok=False)
        run = cls(path, **kw)
        run.set_status("running")
        return run

    # -- files --------------------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        atomic_write_json(target, obj)
        return target

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        atomic_write_text(target, text)
        return target

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        atomic_write_text(self.path / "status", status + "\n")

    @property
    def status(self) -> str:
        return read_status(self.path)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Queue one record for ``metrics.jsonl``; flushed atomically at most every flush_seconds."""
        self._pending.append(dumps(record))
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Append pending records to ``metrics.jsonl``: O(new lines), never a torn line.

        The new lines go out in one ``O_APPEND`` write (retried until complete) followed by an
        fsync; the existing file is never read or copied. If the write fails part-way (disk full,
        file-size limit) the file is truncated back to its previous length, so it keeps only
        complete lines, and the records stay pending. A process killed mid-write leaves at most
        one line without its newline, which :func:`read_metrics` ignores.
        """
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        data = ("\n".join(self._pending) + "\n").encode("utf-8")
        target = self.path / "metrics.jsonl"
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
        self._pending.clear()


class RunReadError(ValueError):
    """A folder is not a readable run (missing, damaged or malformed files)."""


def _read_text(f: Path, folder: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RunReadError(f"{str(folder)!r} is not a readable run: {f.name} is not UTF-8 text "
                           f"(byte {exc.start})") from None
    except OSError as exc:
        raise RunReadError(f"{str(folder)!r} is not a readable run: cannot read {f.name} "
                           f"({exc.strerror or exc})") from None


def read_status(path: Path) -> str:
    """The run's status word, ``"unknown"`` when the file is missing or not one of the statuses."""
    f = Path(path) / "status"
    try:
        word = f.read_text(encoding="utf-8").strip() if f.is_file() else "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return word if word in STATUSES else "unknown"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record of ``metrics.jsonl`` (a last line without its newline is skipped)."""
    folder = Path(path)
    f = folder / "metrics.jsonl"
    if not f.exists():
        return []
    text = _read_text(f, folder)
    lines = text.split("\n")[:-1]  # the part after the last newline is incomplete (or empty)
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunReadError(f"{str(folder)!r} is not a readable run: metrics.jsonl line {i} is "
                               f"not JSON ({exc.msg})") from None
    return out


_PREDICTION_KEYS = ("name", "measured", "predicted", "tolerance", "passed")


def read_summary(path: Path) -> dict[str, Any]:
    """``summary.json`` as a dict, checked: a JSON object whose predictions have every field.

    Raises:
        FileNotFoundError: there is no ``summary.json``.
        RunReadError: the file is not UTF-8, not JSON, not an object, or a prediction lacks a field.
    """
    folder = Path(path)
    f = folder / "summary.json"
    if not f.exists():
        raise FileNotFoundError(
            f"{str(path)!r} has no summary.json (status: {read_status(folder)}); "
            "is it a run folder (runs/<experiment>/<timestamp>-<id>/)?"
        )
    bad = f"{str(folder)!r} is not a readable run: summary.json"
    try:
        s = json.loads(_read_text(f, folder))
    except json.JSONDecodeError as exc:
        raise RunReadError(f"{bad} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                           "the file is damaged or truncated") from None
    if not isinstance(s, dict):
        raise RunReadError(f"{bad} holds a JSON {type(s).__name__}, not an object")
    preds = s.get("predictions", [])
    if not isinstance(preds, list):
        raise RunReadError(f"{bad}: 'predictions' is a {type(preds).__name__}, not a list")
    for i, p in enumerate(preds):
        if not isinstance(p, dict):
            raise RunReadError(f"{bad}: prediction {i} is not an object")
        missing = [k for k in _PREDICTION_KEYS if k not in p]
        if missing:
            raise RunReadError(f"{bad}: prediction {i} has no {', '.join(missing)}")
    if not isinstance(s.get("figures", {}), dict):
        raise RunReadError(f"{bad}: 'figures' is not an object")
    return s
