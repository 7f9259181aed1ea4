"""Recording the forward pass: hooks and forward overrides that collect rule evaluations.

Every module owning a wanted parameter is instrumented: a forward hook (prepended, so it sees the
module's own output before user hooks) records a :class:`Call`, or the rule's ``forward`` override
replaces the module's forward. Output gradients are requested through the autograd *edges* of the
outputs (``get_gradient_edge``), which keeps no output alive and is immune to later in-place ops
on them (``ReLU(inplace=True)``): the gradient is the one of the value the module produced. What
a rule reads (inputs; outputs too for the fallback's check) must not change in place afterwards,
nor may an output that is a view (autograd rebases a view written in place, and its recorded
edge would get no gradient): if either happened, the pass is redone in *clone* mode, which copies
those tensors at the module boundary.

A torch-function mode watches every op that takes a wanted parameter: a parameter may only be used
inside the forward of a module whose rule covers it (its owner; for attention, also its children).
Any other use (``h @ self.emb.weight.T`` in a parent's forward, a penalty inside ``loss_fn``) has no
per-sample record, so it is reported instead of silently dropped. Everything is undone on exit,
also on error.

Two cases need more than a hook:

* *Inputs broadcast over the batch.* A module called on a tensor with leading dimension 1 while
  the batch has ``b > 1`` samples (Hugging Face passes ``position_ids`` of shape ``[1, T]``) gives an
  output with leading 1 that later broadcasts against batch tensors. The gradient reaching that
  output is already summed over the samples, so the hook returns the output *expanded* to ``b``
  (a view: same values, and broadcasting against ``[b, …]`` tensors gives the same result) and
  records the expanded input: the output gradient is then per sample, and the module's rule sees
  sample ``i``'s copy of the input. A model whose forward rejects the expanded shape is measured
  again without expansion (and the rule then names the module).
* *Free parameters* (a module's own parameters next to children that have parameters): each
  op that takes one together with batch tensors is recorded op by op (``_free.py``).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from neurothermo.gradstats._free import free_op, writes
from neurothermo.gradstats._pieces import Piece
from neurothermo.gradstats._shared import Shared
from neurothermo.gradstats.rules import Call, Rule, Use, rule_for
from neurothermo.gradstats.rules.fallback import fallback_pieces, tensor_leaves


def input_leaves(args: Any, kwargs: Any) -> list[Tensor]:
    """The tensor inputs of a call, in the order the layout probe logs them."""
    return tensor_leaves(args) + (tensor_leaves(kwargs) if kwargs else [])


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, Tensor) else x


def _clone_view(x: Any) -> Any:
    return x.clone() if isinstance(x, Tensor) and x._base is not None else x


class Recorder:
    """Collects :class:`Use` records while ``active``."""

    def __init__(self, batch_size: int, wanted: frozenset[int], *, clone: bool,
                 create_graph: bool, names: dict[int, str] | None = None,
                 expand_broadcast: bool = True) -> None:
        self.active = True
        self.clone = clone
        self.create_graph = create_graph
        self.batch_size = batch_size
        self.wanted = wanted
        self.uses: list[Use] = []
        self.names = names or {}
        # (module name, parameter ids covered, free parameter ids handled op by op)
        self.stack: list[tuple[str, frozenset[int], frozenset[int]]] = []
        self.stray: dict[str, str] = {}  # parameter name -> where it was used
        # id -> frame label of parameters used outside their own module's forward, for adoption
        # by that frame's module (None: used so in several frames)
        self.stray_at: dict[int, str | None] = {}
        self.adopted: dict[int, str] = {}  # parameter id -> the fallback module that adopted it
        # outputs shared by every sample (``_shared.py``), when the layout probe ran first: the
        # probe's leading size of each call's output, and the calls seen so far per module
        self.shared: Shared | None = None
        self.probe_out: dict[tuple[str, int], tuple[int, ...] | None] = {}
        self.calls_seen: dict[str, int] = {}
        self.used: set[int] = set()  # ids of wanted parameters some op touched
        self.guarded = False  # the torch-function mode runs (``used`` is filled)
        self.expand_broadcast = expand_broadcast
        self.expanded: list[str] = []  # modules whose broadcast output was expanded to the batch
        self.free_ok: set[int] = set()  # free parameters with an op-level record
        self.free_bad: set[int] = set()  # free parameters with a use that does not fit
        # (module name, tensor inputs) of every recorded call, in order: judged against the
        # layout probe (``_layout.batchless``) before the rules run
        self.inputs: list[tuple[str, list[Tensor]]] = []

    def broadcast(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
                  ) -> tuple[tuple[Any, ...], dict[str, Any], Any] | None:
        """``(args, kwargs, output)`` expanded from leading dimension 1 to the batch, when the
        (tensor) output has leading dimension 1 and ``b > 1``: an output every sample shares
        (from ``position_ids`` of shape ``[1, T]``, or BART's learned positions, computed from
        the shape of the ``[b, T]`` token ids); else None. Only inputs of leading dimension 1 are
        expanded. A rule's output has the leading size of its input, so only a module without a
        rule can give leading 1 from other inputs: the fallback, which maps over the inputs of
        leading ``b`` and refuses a module whose per-sample outputs differ from the batch output
        (one that mixes the samples, as a mean over the batch would)."""
        b = self.batch_size
        if (not self.expand_broadcast or b == 1 or not isinstance(output, Tensor)
                or output.dim() == 0 or output.shape[0] != 1):
            return None
        if not any(t.dim() > 0 for t in tensor_leaves(args) + tensor_leaves(kwargs)):
            return None

        def grow(t: Any) -> Any:
            return (t.expand(b, *t.shape[1:])
                    if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1 else t)

        return tree_map(grow, args), tree_map(grow, kwargs), grow(output)

    def free_op(self, func: Any, args: Any, kwargs: dict[str, Any], params: list[Tensor]) -> Any:
        """Run ``func`` with the free parameters ``params`` given a leading batch axis and record
        their per-sample contributions, or mark them for the fallback (:func:`._free.free_op`)."""
        return free_op(self, func, args, kwargs, params)

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
        # An output that is a view (a 3-d Linear output) and is later written in place is
        # rebased by autograd (CopySlices): its recorded edge would then get no gradient.
        watched += leaves if rule is None else [t for t in leaves if t._base is not None]
        own = (frozenset(id(p) for p in call.module.parameters(recurse=False))
               | frozenset(id(p) for _, p in call.adopted)) & self.wanted
        edges = [get_gradient_edge(leaves[j]) for j in pos]
        self.add(Use(call.name, edges, compute, watched, own))

    def _touched(self, call: Call) -> Call:
        """``call`` restricted to parameters the forward actually used (the rest have zero
        gradient: the fallback need not run for them), less free parameters whose every use
        has an op-level record."""
        if not self.guarded:
            return call
        done = self.free_ok - self.free_bad
        return replace(call, wanted=call.wanted & frozenset(self.used - done))

    def is_shared(self, module: nn.Module, name: str, output: Any) -> bool:
        """Whether this call's output is shared by every sample: its whole shape is the one the
        layout probe saw on ``b'`` samples, so no axis of it follows the batch (an output that
        is merely not batch-first, ``[T, b, d]``, has another shape there)."""
        k = self.calls_seen.get(name, 0)
        self.calls_seen[name] = k + 1
        if not isinstance(output, Tensor) or output.dim() == 0 or not output.requires_grad:
            return False
        if not any(id(p) in self.wanted for p in module.parameters(recurse=False)):
            return False
        return self.probe_out.get((name, k)) == tuple(output.shape)

    def adopt(self, module: nn.Module, name: str) -> tuple[tuple[str, Tensor], ...]:
        """Descendant parameters ``module`` (a module without a rule, at its forward's end) used
        directly in its own forward and nowhere else outside their modules (Hugging Face Mamba
        passes ``conv1d.weight`` and ``dt_proj.weight`` to its kernels): its torch.func fallback
        runs its forward per sample, so it measures them too. ``(name in module, parameter)``;
        they leave ``stray``. A parameter whose own module also runs is refused later
        (``adopted_twice``): its two records could not be told apart."""
        out = []
        for local, p in module.named_parameters():
            if "." in local and self.stray_at.get(id(p)) == name:
                out.append((local, p))
                self.adopted[id(p)] = name
                self.stray.pop(self.names.get(id(p), "?"), None)
        return tuple(out)

    def adopted_twice(self) -> list[str]:
        """Adopted parameters some other record also covers (their own module ran too)."""
        count = Counter(pid for u in self.uses for pid in u.params if pid in self.adopted)
        return sorted(self.names.get(pid, "?") for pid, k in count.items() if k > 1)

    def modified_in_place(self) -> list[str]:
        return sorted({u.name for u in self.uses if u.modified_in_place()})

    def enter(self, name: str, covered: frozenset[int], free: frozenset[int] = frozenset()
              ) -> None:
        if self.active:
            self.stack.append((name, covered, free))

    def leave(self) -> None:
        if self.active and self.stack:
            self.stack.pop()


# Tensor queries that return no tensor: no gradient can flow through them, so the guard lets them
# through without looking at their arguments (most calls it sees during a forward are these).
_QUERIES = frozenset(
    f for f in (
        *(getattr(Tensor, a).__get__ for a in ("shape", "dtype", "device", "requires_grad",
                                               "grad_fn", "_version", "is_leaf", "ndim", "data")
          if hasattr(getattr(Tensor, a, None), "__get__")),
        Tensor.dim, Tensor.size, Tensor.numel, Tensor.is_floating_point, Tensor.is_complex,
        Tensor.stride, Tensor.is_contiguous, Tensor.element_size, Tensor.data_ptr,
        Tensor.__len__,
    )
)


class _ParamUseGuard(TorchFunctionMode):
    """Flags ops on wanted parameters outside the forward of a module whose rule covers them."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        rec = self.rec
        if not rec.active or func in _QUERIES:
            return func(*args, **kwargs)
        params = [t for a in (*args, *kwargs.values())
                  for t in (a if isinstance(a, list | tuple) else (a,))
                  if isinstance(t, Tensor) and id(t) in rec.wanted]
        free = rec.stack[-1][2] if rec.stack else frozenset()
        mine = list({id(p): p for p in params if id(p) in free}.values())
        shared = rec.shared
        found = shared.find(args, kwargs) if shared is not None and shared.derived else []
        if found:
            assert shared is not None
            if mine:  # a shared output and a free parameter in one op: neither is followed
                rec.free_bad.update(id(p) for p in mine)
                shared.derived[id(found[0][1])][1].bad = "it meets a free parameter"
                out = func(*args, **kwargs)
            else:
                out = shared.op(func, args, kwargs, found, writes(func, kwargs))
        else:
            out = rec.free_op(func, args, kwargs, mine) if mine else func(*args, **kwargs)
        if params:
            covered = rec.stack[-1][1] if rec.stack else frozenset()
            for t in params:
                rec.used.add(id(t))
                if id(t) not in covered and any(o.requires_grad for o in tensor_leaves(out)):
                    where = rec.stack[-1][0] if rec.stack else "outside any recorded module"
                    rec.stray.setdefault(rec.names.get(id(t), "?"), where)
                    at = rec.stray_at.setdefault(id(t), where)
                    if at != where:
                        rec.stray_at[id(t)] = None
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
    recorder.guarded = guard
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
            free: frozenset[int] = frozenset()
            if rule is None and guard and any(
                    id(p) in recorder.wanted for c in module.children() for p in c.parameters()):
                free = own & recorder.wanted
            handles.append(module.register_forward_pre_hook(
                _pre_hook(label, own, free, recorder), with_kwargs=True))
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
        if rec.active:
            rec.inputs.append((name, input_leaves(args, kwargs)))
        rec.enter(name, covered)
        out = forward(module, name, rec, args, kwargs)
        rec.leave()
        return out

    return patched_forward


def _pre_hook(name: str, own: frozenset[int], free: frozenset[int], rec: Recorder) -> Any:
    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not rec.active:
            return None
        rec.enter(name, own, free)
        return (tree_map(_clone, args), tree_map(_clone, kwargs)) if rec.clone else None

    return pre_hook


def _hook(name: str, rule: Rule | None, rec: Recorder) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
             output: Any) -> Any:
        if not rec.active:
            return None
        rec.leave()
        grown = rec.broadcast(args, kwargs, output)
        if grown is not None:
            rec.expanded.append(name)
            args, kwargs, output = grown
        leaves_in = input_leaves(args, kwargs)
        rec.inputs.append((name, leaves_in))
        if rec.shared is not None:
            rec.shared.check_inputs(leaves_in, name)
            if grown is None and rec.is_shared(module, name, output):
                rec.shared.add_root(module, name, args, kwargs, output)
                return None
        kept = output if rule is None else None
        adopted = rec.adopt(module, name) if rule is None else ()
        rec.add_call(Call(module, name, args, kwargs, kept, rec.batch_size, rec.wanted, adopted),
                     rule, output)
        if rec.clone:
            return tree_map(_clone if rule is None else _clone_view, output)
        return output if grown is not None else None

    return hook
