"""The checkpoints of ``nt.train``: atomic writes, guarded reads, the RNG states, the fingerprint
of the data and the model, and the check that a resume matches the run that wrote it."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

CHECKPOINT = "checkpoint.pt"
_FORMAT = 2  # 2: the config holds a fingerprint of the data and the model structure


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(ckpt: Path, device: torch.device) -> dict[str, Any]:
    """``torch.load`` (weights only) of a checkpoint, naming the file and the damage on failure."""
    try:
        state = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, UnpicklingError
        size = ckpt.stat().st_size if ckpt.exists() else 0
        raise ValueError(
            f"cannot resume: {ckpt} ({size} bytes) is damaged or truncated and cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            "delete it to start afresh, or resume from a copy of an intact checkpoint") from None
    if not isinstance(state, dict):
        raise ValueError(f"cannot resume: {ckpt} holds a {type(state).__name__}, not a "
                         "neurothermo checkpoint")
    return state


def fingerprint(model: nn.Module, tensors: Sequence[Tensor]) -> dict[str, str]:
    """What a resume must match: a SHA-256 of the training data's values (shapes, dtypes and
    bytes of every tensor, in order) and of the model's structure (module types, parameter and
    buffer names, shapes and dtypes — not their values, which the checkpoint restores)."""
    import hashlib

    data = hashlib.sha256()
    for t in tensors:
        data.update(f"{tuple(t.shape)}{t.dtype}".encode())
        data.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    structure = hashlib.sha256()
    for name, mod in model.named_modules():
        structure.update(f"{name}:{type(mod).__qualname__};".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        structure.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return {"data": data.hexdigest(), "model": structure.hexdigest()}


def _check_config(state: dict[str, Any], config: dict[str, Any], steps: int, ckpt: Path) -> None:
    if state.get("format") != _FORMAT:
        raise ValueError(f"{ckpt} is not a neurothermo checkpoint of format {_FORMAT}")
    saved = state.get("config", {}).get("fingerprint", {})
    for what, why in (("model", "a model of another structure"),
                      ("data", "other training data (same size or not)")):
        if saved.get(what) != config["fingerprint"][what]:
            raise ValueError(
                f"cannot resume from {ckpt}: this call passes {why} than the run that wrote it "
                f"({what} fingerprint {str(saved.get(what))[:12]} there, "
                f"{config['fingerprint'][what][:12]} here); pass the same {what}, or another out= "
                "folder to start a new run")
    for k, v in config.items():
        if k == "fingerprint":
            continue
        if state["config"].get(k) != v:
            raise ValueError(
                f"cannot resume from {ckpt}: it was written with {k}={state['config'].get(k)!r}, "
                f"this call has {k}={v!r}; use the same settings or another out= folder")
    if int(state["step"]) > steps:
        raise ValueError(f"{ckpt} is at step {state['step']}, past steps={steps}")
