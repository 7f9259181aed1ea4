"""Recording the forward pass: hooks and forward overrides that collect rule evaluations.

Every module owning a wanted parameter is instrumented: a forward hook (prepended, so it sees the
module's own output before user hooks) records a :class:`Call`, or the rule's ``forward`` override
replaces the module's forward. Output gradients are requested through the autograd *edges* of the
outputs (``get_gradient_edge``), which keeps no output alive and is immune to later in-place ops
on them (``ReLU(inplace=True)``): the gradient is the one of the value the module produced. What
a rule reads (inputs; outputs too for the fallback's check) must not change in place afterwards:
if it did, the pass is redone in *clone* mode, which copies those tensors at the module boundary.

A torch-function mode watches every op that takes a wanted parameter: a parameter may only be used
inside the forward of a module whose rule covers it (its owner; for attention, also its children).
Any other use (``h @ self.emb.weight.T`` in a parent's forward, a penalty inside ``loss_fn``) has no
per-sample record, so it is reported instead of silently dropped. Everything is undone on exit,
also on error.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from neurothermo.gradstats._pieces import Piece
from neurothermo.gradstats.rules import Call, Rule, Use, rule_for
from neurothermo.gradstats.rules.fallback import fallback_pieces, tensor_leaves


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, Tensor) else x


class Recorder:
    """Collects :class:`Use` records while ``active``."""

    def __init__(self, batch_size: int, wanted: frozenset[int], *, clone: bool,
                 create_graph: bool, names: dict[int, str] | None = None) -> None:
        self.active = True
        self.clone = clone
        self.create_graph = create_graph
        self.batch_size = batch_size
        self.wanted = wanted
        self.uses: list[Use] = []
        self.names = names or {}
        self.stack: list[tuple[str, frozenset[int]]] = []  # (module name, parameter ids covered)
        self.stray: dict[str, str] = {}  # parameter name -> where it was used
        self.used: set[int] = set()  # ids of wanted parameters some op touched
        self.tracks_use = True  # False without the guard mode: then ``used`` stays empty

    def add(self, use: Use) -> None:
        if self.active:
            self.uses.append(use)

    def add_call(self, call: Call, rule: Rule | None, output: Any) -> None:
        """Record a call, evaluated later by ``rule.pieces`` or, for ``rule=None``, the fallback
        (the only one that keeps ``output``: it checks its per-sample outputs against it)."""
        leaves = tensor_leaves(output)
        pos = [j for j, t in enumerate(leaves) if t.requires_grad]
        if not pos:
            return
        n = len(leaves)

        def compute(deltas: list[Tensor | None]) -> list[Piece]:
            full: list[Tensor | None] = [None] * n
            for j, d in zip(pos, deltas):
                full[j] = d
            if rule is not None:
                return rule.pieces(call, full)
            return fallback_pieces(self._touched(call), full)

        watched = tensor_leaves(call.args) + (tensor_leaves(call.kwargs) if call.kwargs else [])
        watched += leaves if rule is None else []
        own = frozenset(id(p) for p in call.module.parameters(recurse=False)) & self.wanted
        edges = [get_gradient_edge(leaves[j]) for j in pos]
        self.add(Use(call.name, edges, compute, watched, own))

    def _touched(self, call: Call) -> Call:
        """``call`` restricted to parameters the forward actually used (the rest have zero
        gradient: the fallback need not run for them)."""
        if not self.tracks_use:  # nothing recorded which parameters ran: keep them all
            return call
        return replace(call, wanted=call.wanted & frozenset(self.used))

    def modified_in_place(self) -> list[str]:
        return sorted({u.name for u in self.uses if u.modified_in_place()})

    def enter(self, name: str, covered: frozenset[int]) -> None:
        if self.active:
            self.stack.append((name, covered))

    def leave(self) -> None:
        if self.active and self.stack:
            self.stack.pop()


class _ParamUseGuard(TorchFunctionMode):
    """Flags ops on wanted parameters outside the forward of a module whose rule covers them."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self.rec
        if rec.active:
            covered = rec.stack[-1][1] if rec.stack else frozenset()
            for a in (*args, *kwargs.values()):
                for t in (a if isinstance(a, list | tuple) else (a,)):
                    if not (isinstance(t, Tensor) and id(t) in rec.wanted):
                        continue
                    rec.used.add(id(t))
                    if id(t) not in covered and any(o.requires_grad for o in tensor_leaves(out)):
                        where = rec.stack[-1][0] if rec.stack else "outside any recorded module"
                        rec.stray.setdefault(rec.names.get(id(t), "?"), where)
        return out


@contextmanager
def recording(model: nn.Module, recorder: Recorder, *, guard: bool = True) -> Iterator[Recorder]:
    """Instrument every module of ``model`` that owns a wanted parameter; undo on exit.

    ``guard=False`` leaves out the torch-function mode that reports parameters used outside their
    module (``passive.py``: a mode left on the stack by an interrupted forward would outlive it).
    """
    handles = []
    patched: list[tuple[nn.Module, Any]] = []
    missing = object()
    mode = _ParamUseGuard(recorder) if guard else nullcontext()
    recorder.tracks_use = guard
    try:
        for name, module in model.named_modules():
            own = frozenset(id(p) for p in module.parameters(recurse=False))
            if not own & recorder.wanted:
                continue
            label = name or type(module).__name__
            rule = rule_for(module)
            if rule is not None and rule.forward is not None:
                covered = frozenset(id(p) for p in module.parameters())
                patched.append((module, module.__dict__.get("forward", missing)))
                module.forward = _override(module, label, rule, recorder, covered)
                continue
            handles.append(module.register_forward_pre_hook(_pre_hook(label, own, recorder),
                                                            with_kwargs=True))
            handles.append(module.register_forward_hook(_hook(label, rule, recorder),
                                                        with_kwargs=True, prepend=True))
        with mode:
            yield recorder
    finally:
        for h in handles:
            h.remove()
        for module, old in patched:
            if old is missing:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = old


def _override(module: nn.Module, name: str, rule: Rule, rec: Recorder,
              covered: frozenset[int]) -> Any:
    forward = rule.forward
    assert forward is not None

    def patched_forward(*args: Any, **kwargs: Any) -> Any:
        rec.enter(name, covered)
        out = forward(module, name, rec, args, kwargs)
        rec.leave()
        return out

    return patched_forward


def _pre_hook(name: str, own: frozenset[int], rec: Recorder) -> Any:
    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not rec.active:
            return None
        rec.enter(name, own)
        return (tree_map(_clone, args), tree_map(_clone, kwargs)) if rec.clone else None

    return pre_hook


def _hook(name: str, rule: Rule | None, rec: Recorder) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
             output: Any) -> Any:
        if not rec.active:
            return None
        rec.leave()
        kept = output if rule is None else None
        rec.add_call(Call(module, name, args, kwargs, kept, rec.batch_size, rec.wanted), rule,
                     output)
        return tree_map(_clone, output) if rec.clone and rule is None else None

    return hook
