"""Where a monitor's rows go while training runs: JSON lines (always); TensorBoard, Weights & Biases
and MLflow when installed.

A writer is any object with ``write(rows, meta)`` (rows: the dicts of :meth:`History.to_dicts`,
newly flushed, in step order) and ``flush()``; ``truncate(after_step)`` (optional) drops rows after
a step when a run resumes from a checkpoint; ``close()`` (optional) releases files.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from neurothermo.monitor.history import dumps_row


@runtime_checkable
class Writer(Protocol):
    """What :class:`ThermoMonitor` needs of a ``writer=``: any object with these two methods.

    ``write(rows, meta)`` receives new rows (each a dict with ``"step"`` and the columns recorded
    at that step: floats, or nested lists for per-unit vectors and matrices) and the history's
    ``meta``; ``flush()`` is called at the end of training and before checkpoints.
    :class:`JSONLWriter`, :class:`TensorBoardWriter`, :class:`WandbWriter` and
    :class:`MLflowWriter` implement it.
    """

    def write(self, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...


class JSONLWriter:
    """Append rows to a JSON-lines file; the first line is ``{"__meta__": meta}``.

    Readable with :meth:`History.from_jsonl` or ``[json.loads(line) for line in open(path)]``.
    Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON).
    Each ``write`` opens, appends and closes the file; an existing file is appended to (its meta
    line is not repeated).

    Args:
        path: the ``.jsonl`` file (its folder is created if missing).

    Raises:
        IsADirectoryError: ``path`` is a directory.
        OSError: the folder cannot be created (propagated).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.jsonl"
        >>> monitor = nt.ThermoMonitor(model, loss_fn, noise_every=None,
        ...                           writer=nt.JSONLWriter(path))
        >>> history = nt.train(model, loss_fn, (x, y), lr=0.1, batch_size=8, steps=40, monitor=monitor)
        >>> back = nt.History.from_jsonl(path)
        >>> int(back.steps("loss")[-1]) == int(history.steps("loss")[-1])
        True
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"JSONLWriter needs a file path, got the directory {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._started = self.path.exists() and self.path.stat().st_size > 0

    def write(self, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            if not self._started:
                f.write(dumps_row({"__meta__": dict(meta)}) + "\n")
                self._started = True
            for row in rows:
                f.write(dumps_row(row) + "\n")

    def flush(self) -> None:  # every write closes the file
        return None

    def truncate(self, after_step: int) -> None:
        """Keep the meta line and rows with ``step <= after_step`` (atomic rewrite)."""
        if not self.path.exists():
            return
        keep = []
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if "__meta__" in row or int(row["step"]) <= after_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, self.path)
        self._started = bool(keep)


class TensorBoardWriter:
    """Scalars as ``add_scalar``, per-unit vectors as ``add_histogram`` (needs ``tensorboard``).

    Column names are used as tags (``grad_sq/fc1``, ``charge_err/sym0``, …), so TensorBoard groups
    them by their prefix. Matrices (double-rotation charges) are written as histograms of entries.

    Args:
        log_dir: the TensorBoard log folder (created by ``SummaryWriter``).

    Raises:
        ImportError: ``tensorboard`` is not installed (the ``monitor`` extra).

    Example:
        >>> import tempfile
        >>> from neurothermo.monitor import TensorBoardWriter
        >>> tb = TensorBoardWriter(tempfile.mkdtemp())
        >>> tb.write([{"step": 0, "loss": 1.25, "grad_sq/fc1": [0.5, 0.25]}], meta={})
        >>> tb.flush()
        >>> any(tb.log_dir.iterdir())  # the event file
        True
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError when tensorboard is missing
            raise ImportError(
                "TensorBoardWriter needs the 'tensorboard' package (pip install tensorboard); "
                "JSONLWriter works without it"
            ) from e
        self._w = SummaryWriter(log_dir=str(log_dir))
        # tensorboard's SummaryWriter.get_logdir carries no annotations
        self.log_dir = Path(self._w.get_logdir())  # type: ignore[no-untyped-call]

    def write(self, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
        import numpy as np

        for row in rows:
            step = int(row["step"])
            for tag, value in row.items():
                if tag == "step":
                    continue
                if isinstance(value, list):
                    arr = np.asarray(value, dtype=np.float64)
                    if arr.size and np.isfinite(arr).all():
                        self._w.add_histogram(tag, arr, global_step=step)
                else:
                    self._w.add_scalar(tag, float(value), global_step=step)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The scalar columns of a row (per-unit vectors and matrices are left to histogram writers)."""
    return {k: float(v) for k, v in row.items() if k != "step" and not isinstance(v, list)}


class WandbWriter:
    """Rows to a Weights & Biases run: scalars with ``run.log(..., step=step)``, vectors as
    ``wandb.Histogram`` (needs ``wandb``; install the ``wandb`` extra).

    ``run``: an active run (``wandb.init(...)``), or None to start one with ``init_kwargs``
    (``mode="offline"`` logs to local files, synced later with ``wandb sync``). ``close()``
    finishes a run this writer started. Under ``torch.distributed`` only rank 0 receives rows.

    Args:
        run: an active wandb run, or None to start one.
        **init_kwargs: keyword arguments of ``wandb.init`` (only without ``run``).

    Raises:
        ImportError: ``wandb`` is not installed (the ``wandb`` extra).
        ValueError: both ``run`` and ``init_kwargs`` given.

    Example:
        >>> from neurothermo.monitor import WandbWriter
        >>> class Run:  # stands in for wandb.init(mode="offline")
        ...     def __init__(self) -> None:
        ...         self.logged: list[tuple[int, dict[str, float]]] = []
        ...     def log(self, data: dict[str, float], step: int) -> None:
        ...         self.logged.append((step, data))
        >>> writer = WandbWriter(run=Run())
        >>> writer.write([{"step": 3, "loss": 0.5}], meta={})
        >>> writer.run.logged
        [(3, {'loss': 0.5})]
    """

    def __init__(self, run: Any = None, **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbWriter needs the 'wandb' package (pip install "
                              "'neurothermo[wandb]'); JSONLWriter works without it") from e
        if run is not None and init_kwargs:
            raise ValueError("give either an active run or wandb.init keyword arguments, not both")
        self._wandb = wandb
        self._owned = run is None
        self.run = wandb.init(**init_kwargs) if run is None else run

    def write(self, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
        import numpy as np

        for row in rows:
            out: dict[str, Any] = _scalars(row)
            for k, v in row.items():
                if isinstance(v, list):
                    arr = np.asarray(v, dtype=np.float64).reshape(-1)
                    if arr.size and np.isfinite(arr).all():
                        out[k] = self._wandb.Histogram(arr.tolist())
            self.run.log(out, step=int(row["step"]))

    def flush(self) -> None:  # wandb streams in the background
        return None

    def close(self) -> None:
        if self._owned:
            self.run.finish()


class MLflowWriter:
    """Scalar columns to an MLflow run with ``log_metrics(..., step=step)`` (needs ``mlflow`` or
    ``mlflow-skinny``; install the ``mlflow`` extra).

    MLflow metric keys may not contain ``:`` (``layer_ratio/0:2``): it is written as ``-``. Per-unit
    vectors are not written (MLflow metrics are scalars; keep a JSONLWriter beside it for them).
    ``run_id``: log to that run, else a new run is started (``tracking_uri``, e.g.
    ``"file:/path/mlruns"`` for a local file store, and ``experiment`` name if given); ``close()``
    ends a run this writer started.

    Args:
        run_id: an existing MLflow run to log to; None to start one.
        tracking_uri: the tracking server or store (None: MLflow's default).
        experiment: the experiment name of a new run (created if missing); None: experiment 0.

    Raises:
        ImportError: ``mlflow`` is not installed (the ``mlflow`` extra).
        mlflow.exceptions.MlflowException: the store cannot be reached or the run does not
            exist (propagated).

    Example:
        >>> import os, pathlib, tempfile
        >>> from neurothermo.monitor import MLflowWriter
        >>> os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # recent MLflow wants a database otherwise
        >>> store = pathlib.Path(tempfile.mkdtemp()) / "mlruns"
        >>> writer = MLflowWriter(tracking_uri=store.as_uri(), experiment="demo")
        >>> writer.write([{"step": 0, "loss": 1.5, "layer_ratio/0:2": 0.5}], meta={})
        >>> sorted(writer.client.get_run(writer.run_id).data.metrics)  # ":" is not allowed in keys
        ['layer_ratio/0-2', 'loss']
        >>> writer.close()
        >>> del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    """

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 experiment: str | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError("MLflowWriter needs the 'mlflow' package (pip install "
                              "'neurothermo[mlflow]'); JSONLWriter works without it") from e
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._owned = run_id is None
        if run_id is None:
            exp_id = "0"
            if experiment is not None:
                found = self.client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id).info.run_id
        self.run_id = run_id

    @staticmethod
    def key(column: str) -> str:
        """The MLflow metric key of a column (``:`` is not allowed in MLflow keys)."""
        return column.replace(":", "-")

    def write(self, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self.key(k), v, now, int(row["step"]))
                   for row in rows for k, v in _scalars(row).items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def flush(self) -> None:  # log_batch is synchronous
        return None

    def close(self) -> None:
        if self._owned:
            self.client.set_terminated(self.run_id)
