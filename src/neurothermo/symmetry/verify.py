"""Check a symmetry numerically: transform the model by random group elements, compare outputs."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._state import preserved_state
from neurothermo._validate import check_int
from neurothermo.symmetry.base import Symmetry
from neurothermo.symmetry.capture import Args, call, leaves, split_inputs

_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def default_tolerance(dtype: torch.dtype) -> float:
    """Largest relative output change accepted as exact: float64 1e-10, float32 1e-5, else 1e-2."""
    return _TOL.get(dtype, 1e-2)


def _forward(model: nn.Module, inputs: Args, seed: int) -> list[Tensor]:
    xs = [x for x in (*inputs[0], *inputs[1].values()) if isinstance(x, Tensor)]
    devices = sorted({x.device.index or 0 for x in xs if x.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)  # identical dropout masks for the original and transformed model
        out = leaves(call(model, inputs))
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
    model: nn.Module, symmetry: Symmetry, inputs: Any, *,
    trials: int = 3, seed: int = 0,
) -> float:
    """Largest relative change of the outputs over ``trials`` random group elements.

    ``max_t max_k ‖f_{g_t·θ}(x)_k − f_θ(x)_k‖ / ‖f_θ(x)_k‖`` (Frobenius norms over the batch, ``k``
    over the output tensors). ``inputs``: a tensor, a tuple of tensors (positional arguments) or
    a mapping of tensors (keyword arguments). The model runs in its current train/eval mode with
    the same RNG seed for every forward (dropout masks agree); parameters, buffers, flags and
    ``.grad`` are restored. Exact symmetries give rounding error (float64 ~1e-15, float32 ~1e-7).

    Args:
        model: the network the symmetry was found in.
        symmetry: a :class:`Symmetry` of ``model`` (e.g. from :func:`find_symmetries`).
        inputs: the inputs to run the model on, as above.
        trials: the number of random group elements tried.
        seed: seeds the random group elements (and every forward's RNG).

    Returns:
        The largest relative output change, a Python float (0 for no change).

    Raises:
        TypeError: ``symmetry`` is not a :class:`Symmetry`.
        ValueError: ``trials`` is not a positive integer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> sym = next(s for s in nt.find_symmetries(model, x[:4]) if s.kind == "rescale")
        >>> nt.verify_symmetry(model, sym, x[:4]) < 1e-5  # relative output change under random elements
        True
    """
    if not isinstance(symmetry, Symmetry):
        raise TypeError(f"symmetry must be a Symmetry, got {type(symmetry).__name__}")
    trials = check_int("trials", trials)
    xs = split_inputs(inputs)
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


def _ref_tensor(model: nn.Module, sym: Symmetry) -> Tensor:
    first = sym.slices[0]
    return model.get_buffer(first.name) if first.buffer else model.get_parameter(first.name)


class JointCheck:
    """Verify many candidates with few forward passes (used by :func:`find_symmetries`).

    The composition of symmetries is a symmetry, so a group of candidates is checked at once by
    applying a random element of each (``max_t`` over ``trials`` draws of the relative output
    change). A group whose change exceeds the tolerance is split in halves until each failing
    candidate is alone: ``k`` false candidates among ``n`` cost ``O(k·log n)`` checks instead of
    ``n``. A candidate accepted in a group is reported with the group's change.
    """

    def __init__(self, model: nn.Module, inputs: Args, trials: int, seed: int,
                 tick: Callable[[int], None] | None = None) -> None:
        self.model, self.inputs, self.trials, self.seed = model, inputs, trials, seed
        self.tick = tick
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.buffers: dict[str, Tensor] = {}
        self.ref: list[Tensor] = []

    @contextmanager
    def session(self) -> Iterator[JointCheck]:
        with preserved_state(self.model):
            self.ref = _forward(self.model, self.inputs, self.seed)
            self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
            try:
                yield self
            finally:
                _restore(self.model, self.params, self.buffers)

    def change(self, group: Sequence[Symmetry]) -> float:
        worst = 0.0
        for t in range(self.trials):
            gen = torch.Generator().manual_seed(self.seed + 7919 * t)
            try:
                for sym in group:
                    ref_t = _ref_tensor(self.model, sym)
                    sym.transform(self.model, sym.random_element(gen, dtype=ref_t.dtype,
                                                                 device=ref_t.device))
                worst = max(worst, relative_change(self.ref, _forward(self.model, self.inputs,
                                                                      self.seed)))
            finally:
                _restore(self.model, self.params, self.buffers)
        if self.tick is not None:
            self.tick(len(group))
        return worst

    def split(self, cands: Sequence[Symmetry], limits: Sequence[float]) -> list[float]:
        """Each candidate's change: its group's if the group passed, else its own."""
        out = [0.0] * len(cands)

        def rec(idx: list[int]) -> None:
            if not idx:
                return
            c = self.change([cands[i] for i in idx])
            if len(idx) == 1 or c <= min(limits[i] for i in idx):
                for i in idx:
                    out[i] = c
                return
            rec(idx[: len(idx) // 2])
            rec(idx[len(idx) // 2:])

        rec(list(range(len(cands))))
        return out
