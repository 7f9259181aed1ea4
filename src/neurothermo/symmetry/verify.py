"""Check a symmetry numerically: transform the model by random group elements, compare outputs."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._state import preserved_state
from neurothermo._validate import check_int
from neurothermo.symmetry.base import Symmetry

_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def default_tolerance(dtype: torch.dtype) -> float:
    """Largest relative output change accepted as exact: float64 1e-10, float32 1e-5, else 1e-2."""
    return _TOL.get(dtype, 1e-2)


def _leaves(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _leaves(v)]
    return []


def _forward(model: nn.Module, inputs: tuple[Tensor, ...], seed: int) -> list[Tensor]:
    devices = sorted({x.device.index or 0 for x in inputs if x.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)  # identical dropout masks for the original and transformed model
        out = _leaves(model(*inputs))
    if not out:
        raise TypeError("the model's output contains no tensor to compare")
    return [o.detach().clone() for o in out]


def relative_change(ref: list[Tensor], new: list[Tensor]) -> float:
    """``max_k ‖new_k − ref_k‖ / ‖ref_k‖`` over output tensors (absolute where ``ref_k = 0``)."""
    worst = 0.0
    for r, o in zip(ref, new):
        if not bool(torch.isfinite(o).all()):
            return float("inf")
        d = torch.linalg.vector_norm((o - r).double())
        s = torch.linalg.vector_norm(r.double())
        worst = max(worst, float(d / s) if float(s) > 0 else float(d))
    return worst


def verify_symmetry(
    model: nn.Module, symmetry: Symmetry, inputs: Tensor | tuple[Tensor, ...], *,
    trials: int = 3, seed: int = 0,
) -> float:
    """Largest relative change of the outputs over ``trials`` random group elements.

    ``max_t max_k ‖f_{g_t·θ}(x)_k − f_θ(x)_k‖ / ‖f_θ(x)_k‖`` (Frobenius norms over the batch, ``k``
    over the output tensors). The model runs in its current train/eval mode with the same RNG seed
    for every forward (dropout masks agree); parameters, buffers, flags and ``.grad`` are restored.
    Exact symmetries give rounding error (float64 ~1e-15, float32 ~1e-7).
    """
    if not isinstance(symmetry, Symmetry):
        raise TypeError(f"symmetry must be a Symmetry, got {type(symmetry).__name__}")
    trials = check_int("trials", trials)
    xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not xs or not all(isinstance(x, Tensor) for x in xs):
        raise TypeError("inputs must be a tensor or a tuple of tensors (model.forward's arguments)")
    first = symmetry.slices[0]
    ref_t = model.get_buffer(first.name) if first.buffer else model.get_parameter(first.name)
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    worst = 0.0
    with preserved_state(model):
        ref = _forward(model, xs, seed)
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
        try:
            for _ in range(trials):
                element = symmetry.random_element(gen, dtype=ref_t.dtype, device=ref_t.device)
                symmetry.transform(model, element)
                worst = max(worst, relative_change(ref, _forward(model, xs, seed)))
                _restore(model, params, saved)
        finally:
            _restore(model, params, saved)
    return worst


def _restore(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
