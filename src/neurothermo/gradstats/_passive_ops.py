"""The passive capture's recorder: the caller's pass stays bit for bit its own.

:class:`PassiveRecorder` batches a free parameter (the model's own ``cls_token`` / ``pos_embed``)
only in ops whose result is the same bits either way, and :class:`BroadcastWatch` lets an output
expanded from a broadcast input (``position_ids`` of shape ``[1, T]``) reach only such ops. Any
other use sets ``problem``, and :class:`~neurothermo.gradstats.passive.BackwardCapture` declines.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from neurothermo.gradstats._capture import _QUERIES, Recorder
from neurothermo.gradstats._free import writes

# Ops whose result is bit for bit the same when an operand of leading dimension 1 is replaced by
# its expansion to the batch (a stride-0 view): TensorIterator broadcasts by that very expansion,
# and the backward reduces the gradient with the same ``sum_to`` either way.
_BROADCASTING = frozenset({
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__",
    "sub_", "rsub", "mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__",
    "__rtruediv__", "__itruediv__", "div_", "true_divide", "where", "addcmul", "addcdiv",
})
# Views and casts of an expanded operand: the result is again an expansion of the same values.
_PASSTHROUGH = frozenset({"expand", "expand_as", "to", "type_as", "float", "double", "half",
                          "bfloat16"})


def _op_name(func: Any) -> str:
    return str(getattr(func, "__name__", ""))


class PassiveRecorder(Recorder):
    """A :class:`Recorder` that keeps the caller's pass bit for bit its own.

    Free parameters (the model's own ``cls_token`` / ``pos_embed``) are given their batched view
    only in ops of :data:`_BROADCASTING` / :data:`_PASSTHROUGH` (else they are marked bad and the
    capture declines); outputs of broadcast inputs are expanded to the batch and remembered, so
    that :class:`BroadcastWatch` can check what consumes them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # id(expanded) → (it, the original, index of its module in ``expanded``)
        self.marked: dict[int, tuple[Tensor, Tensor, int]] = {}
        self.problem: str | None = None

    def free_op(self, func: Any, args: Any, kwargs: dict[str, Any], params: list[Tensor]) -> Any:
        name = _op_name(func)
        if name not in _BROADCASTING and name not in _PASSTHROUGH:
            self.free_bad.update(id(p) for p in params)
            if self.problem is None:
                self.problem = (f"the model's own parameter(s) "
                                f"{[self.names.get(id(p), '?') for p in params]} are used by "
                                f"{name or func!r}, which the capture cannot batch bit for bit")
            return func(*args, **kwargs)
        return super().free_op(func, args, kwargs, params)

    def broadcast(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
                  ) -> tuple[tuple[Any, ...], dict[str, Any], Any] | None:
        grown = super().broadcast(args, kwargs, output)
        if grown is not None:
            self.marked[id(grown[2])] = (grown[2], output, len(self.expanded))  # (appended next)
        return grown


class BroadcastWatch(TorchFunctionMode):
    """Lets an expanded output (see :class:`PassiveRecorder`) reach only ops that give the same
    bits as the broadcast original; any other op gets the original, and the capture declines."""

    def __init__(self, rec: PassiveRecorder) -> None:
        super().__init__()
        self.rec = rec

    def _original(self, t: Any) -> Any:
        m = self.rec.marked.get(id(t)) if isinstance(t, Tensor) else None
        return m[1] if m is not None and m[0] is t else t

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        marked = self.rec.marked
        if not marked or func in _QUERIES:
            return func(*args, **kwargs)
        leaves = [t for a in (*args, *kwargs.values())
                  for t in (a if isinstance(a, list | tuple) else (a,)) if isinstance(t, Tensor)]
        hit = [t for t in leaves if id(t) in marked and marked[id(t)][0] is t]
        if not hit:
            return func(*args, **kwargs)
        name = _op_name(func)
        if name == "__get__":  # an attribute: fine unless a tensor view of it (such as .T)
            out = func(*args, **kwargs)
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            if not isinstance(out, Tensor) or attr in ("_base", "grad"):  # (read by the hooks)
                return out
            name = f".{attr}"
        elif name in _BROADCASTING or name in _PASSTHROUGH:
            b = self.rec.batch_size
            if writes(func, kwargs):  # in place: only into a batch tensor of the caller's own
                target = args[0] if args else None
                if (isinstance(target, Tensor) and not any(target is t for t in hit)
                        and target.dim() > 0 and target.shape[0] == b):
                    return func(*args, **kwargs)
            else:
                out = func(*args, **kwargs)
                if isinstance(out, Tensor) and all(
                        id(t) in marked or t.dim() == 0 or t.shape[0] == 1 for t in leaves):
                    # still an expansion (a cast, or with other broadcast operands): follow it
                    orig = func(*tree_map(self._original, args), **tree_map(self._original, kwargs))
                    if out is not orig:
                        marked[id(out)] = (out, orig, marked[id(hit[0])][2])
                return out
        if self.rec.problem is None:
            i = marked[id(hit[0])][2]
            module = self.rec.expanded[i] if i < len(self.rec.expanded) else "?"
            self.rec.problem = (f"the output of {module!r} (a broadcast input of "
                                f"leading dimension 1) is used by {name or func!r}, which the "
                                "capture cannot batch bit for bit")
        return func(*tree_map(self._original, args), **tree_map(self._original, kwargs))
