"""Numerical checks of detected candidates: joint verification, and approximate symmetries.

Exact candidates are verified together (see :class:`~neurothermo.symmetry.verify.JointCheck`).
A scale candidate whose normalisation has ``eps > 0`` is exact only in the limit ``eps → 0``:
it is checked with every normalisation's eps set to the dtype's smallest normal number (torch
refuses eps = 0 in train mode), and its *breaking* is measured where it arises: the relative
change of the normalisation's output ``‖N(s·x) − N(x)‖ / ‖N(x)‖`` under random group elements
``s``, on the inputs the normalisation received in one forward pass (``O(eps/σ²)``; the
normalisation's mode as it is). Layouts this cannot read fall back to the model-output change.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._state import preserved_state
from neurothermo.symmetry.base import Symmetry
from neurothermo.symmetry.capture import Args, call
from neurothermo.symmetry.progress import Progress
from neurothermo.symmetry.verify import JointCheck, default_tolerance

_NORM = nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm | nn.RMSNorm


@dataclass(frozen=True)
class Rejection:
    """A pattern that is not reported, and why.

    Attributes:
        location: where in the model (as :attr:`Symmetry.location`).
        reason: why it is not a symmetry (or not reported), in words.
        kind: the kind of symmetry it looked like, if any.
        change: the measured relative output change, if it was tested numerically.
    """

    location: str
    reason: str
    kind: str | None = None
    change: float | None = None

    def __str__(self) -> str:
        kind = f"{self.kind}: " if self.kind else ""
        return f"{kind}{self.location}: {self.reason}"


@dataclass
class Cand:
    order: tuple[int, int]
    sym: Symmetry
    eps: str = ""  # the normalisations whose eps > 0 break it (scale symmetries)
    norms: list[tuple[str, str]] = field(default_factory=list)  # (module path, channel|group|whole)
    sites: frozenset[Any] = frozenset()  # graph nodes the walk reached (see ``reentry.py``)
    calls: int = 1  # copies merged: the same pattern inside each call of a re-entered module


@contextmanager
def _tiny_eps(model: nn.Module) -> Iterator[None]:
    """Every normalisation's eps set to the dtype's smallest normal number (the eps → 0 limit;
    torch refuses eps = 0 in train mode)."""
    saved: list[tuple[Any, Any]] = []
    for mod in model.modules():
        if isinstance(mod, _NORM):
            w = next(iter(mod.parameters()), None)
            dtype = w.dtype if w is not None and w.is_floating_point() else torch.float32
            saved.append((mod, mod.eps))
            mod.eps = torch.finfo(dtype).tiny
    try:
        yield
    finally:
        for mod, eps in saved:
            mod.eps = eps


def _factor(sym: Symmetry, element: Tensor, kind: str, x: Tensor) -> Tensor | None:
    """The element as a factor on the normalisation's input ``x`` (None: layout not read)."""
    if kind == "whole":
        return element.reshape(())
    if x.ndim < 2 or x.shape[1] % sym.n_units:
        return None
    per = element.repeat_interleave(x.shape[1] // sym.n_units) if kind == "group" else element
    if kind == "channel" and sym.n_units != x.shape[1]:
        return None
    return per.reshape(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)


def local_breaking(model: nn.Module, inputs: Args, cands: list[Cand], trials: int,
                   seed: int = 0) -> list[float | None]:
    """``max_t ‖N(s_t·x) − N(x)‖ / ‖N(x)‖`` at each candidate's normalisation (one forward)."""
    paths = {c.norms[0][0] for c in cands if len(c.norms) == 1}
    seen: dict[str, Tensor] = {}
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: seen.setdefault(p, a[0].detach())) for p in paths]
    out: list[float | None] = []
    with preserved_state(model), torch.no_grad():
        try:
            call(model, inputs)
        finally:
            for h in handles:
                h.remove()
        gen = torch.Generator().manual_seed(seed)
        for c in cands:
            if len(c.norms) != 1 or c.norms[0][0] not in seen:
                out.append(None)
                continue
            path, kind = c.norms[0]
            norm, x = model.get_submodule(path), seen[path]
            ref = norm(x)
            worst = 0.0
            for _ in range(trials):
                e = c.sym.random_element(gen, dtype=x.dtype, device=x.device)
                f = _factor(c.sym, e, kind, x)
                if f is None:
                    worst = float("nan")
                    break
                d = torch.linalg.vector_norm((norm(x * f) - ref).double())
                worst = max(worst, float(d / torch.linalg.vector_norm(ref.double())))
            out.append(None if worst != worst else worst)
    return out


def verify_candidates(
    model: nn.Module, inputs: Any, cands: list[Cand], rejected: list[Rejection],
    tol: float | None, approx_tol: float | None, trials: int, prog: Progress,
) -> list[tuple[tuple[int, int], Symmetry, float]]:
    """``(order, symmetry, change)`` of the candidates that hold (exactly or approximately);
    the others are appended to ``rejected`` with the measured change."""
    def limit(sym: Symmetry) -> float:
        first = sym.slices[0]
        t = model.get_buffer(first.name) if first.buffer else model.get_parameter(first.name)
        return tol if tol is not None else default_tolerance(t.dtype)

    done = [0]

    def tick(n: int) -> None:
        done[0] += 1
        prog(f"verifying {len(cands)} candidates: check {done[0]}", minor=True)

    def reject(c: Cand, change: float, extra: str = "") -> None:
        rejected.append(Rejection(c.sym.location, f"looks like a {c.sym.kind} symmetry, but random "
                                  f"group elements change the outputs by {change:.1e} > "
                                  f"{limit(c.sym):.0e}{extra}", c.sym.kind, change))

    kept: list[tuple[tuple[int, int], Symmetry, float]] = []
    plain = [c for c in cands if not c.eps]
    suspects = [c for c in cands if c.eps]
    prog(f"verifying {len(cands)} candidates")
    check = JointCheck(model, inputs, trials, seed=0, tick=tick)
    with check.session():
        for c, ch in zip(plain, check.split([c.sym for c in plain], [limit(c.sym) for c in plain])):
            if ch <= limit(c.sym):
                kept.append((c.order, c.sym, ch))
            else:
                reject(c, ch)
        if approx_tol is None:  # strict: each suspect on its own, at the model's eps
            for c in suspects:
                ch = check.change([c.sym])
                if ch <= limit(c.sym):
                    kept.append((c.order, c.sym, ch))
                else:
                    reject(c, ch, f" ({c.eps}: scale invariance holds only up to O(eps/variance); "
                                  "pass approx_tol to report it as approximate)")
            return kept
        outer_ref = check.ref
        if suspects:
            with _tiny_eps(model), check.session():
                limits = [limit(c.sym) for c in suspects]
                at_zero = check.split([c.sym for c in suspects], limits)
            check.ref = outer_ref
        ok = [c for c, z, lim in zip(suspects, at_zero, limits) if z <= lim] if suspects else []
        breaking = local_breaking(model, inputs, ok, trials)
        measured = {id(c): b if b is not None else check.change([c.sym])
                    for c, b in zip(ok, breaking)}
    for c, z, lim in zip(suspects, at_zero, limits) if suspects else ():
        if z > lim:
            reject(c, z, " with every eps → 0: not a symmetry")
        elif measured[id(c)] > approx_tol:
            reject(c, measured[id(c)], f" ({c.eps}: exact only as eps → 0, and the breaking "
                                       f"{measured[id(c)]:.1e} exceeds approx_tol={approx_tol:.0e})")
        else:
            sym = replace(c.sym, exact=False, breaking=measured[id(c)], broken_by=c.eps)
            kept.append((c.order, sym, z))
    return kept
