"""Free parameters: a module's own parameters next to children with parameters, recorded op by op.

A module without a rule that owns parameters *and* contains modules with parameters (a model's own
``cls_token`` / ``pos_embed``) would otherwise send its whole forward through the per-module
torch.func fallback. Instead each op that takes such a parameter ``p`` together with batch tensors
is run on ``p`` viewed with a leading batch axis and expanded to ``b`` (``p'[i] = p`` for every i);
when that gives the op's own output shape (broadcasting ops, ``expand``, batched ``matmul`` …),
sample ``i``'s output reads only ``p'[i]``, so the gradient reaching ``p'[i]`` is exactly sample
``i``'s contribution ``c_i(p)`` (summed before squaring with the other uses of ``p``). If any use
of ``p`` does not fit (an op on ``p`` alone, a changed shape, an error), ``p`` goes through the
fallback of the module as before, and its op records are dropped, so nothing is counted twice.
Modules without children keep the fallback, whose check catches modules that mix samples.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_map

from neurothermo.gradstats._pieces import Dense, Piece
from neurothermo.gradstats.rules import Use
from neurothermo.gradstats.rules.fallback import tensor_leaves

if TYPE_CHECKING:
    from neurothermo.gradstats._capture import Recorder


def writes(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` writes into a tensor argument (``add_``, ``__iadd__``, ``out=``)."""
    name = getattr(func, "__name__", "")
    return ("out" in kwargs or (name.endswith("_") and not name.endswith("__"))
            or (name.startswith("__i") and name.endswith("__")))


def free_op(rec: Recorder, func: Any, args: Any, kwargs: dict[str, Any], params: list[Tensor]
            ) -> Any:
    """Run ``func`` with the free parameters ``params`` given a leading batch axis (see the
    module docstring); record their per-sample contributions on ``rec``, or mark them for the
    fallback (``rec.free_bad``).

    An out-of-place op runs as given first (its output shape decides the batched view, and
    is the answer if the view does not fit); an in-place op (``x += p``) runs exactly once,
    its batched view decided by the tensor it writes to."""
    b = rec.batch_size
    target = args[0] if args and isinstance(args[0], Tensor) else None
    shape: torch.Size | None
    if writes(func, kwargs):
        out0 = None
        # Writing into a view goes through autograd's CopySlices, which cannot hand out the
        # gradient at the parameter's batched view (torch 2.13 asserts): fallback for p.
        if (target is None or not torch.is_grad_enabled() or "out" in kwargs
                or target._base is not None or any(target is p for p in params)):
            rec.free_bad.update(id(p) for p in params)  # no per-sample record: fallback
            return func(*args, **kwargs)
        shape = target.shape
    else:
        out0 = func(*args, **kwargs)
        if not any(o.requires_grad for o in tensor_leaves(out0)):
            return out0  # detached copies: no gradient flows through this use
        shape = out0.shape if isinstance(out0, Tensor) and torch.is_grad_enabled() else None
    subs: dict[int, Tensor] = {}
    ok = shape is not None and len(shape) > 0 and shape[0] == b
    for p in params if ok else ():
        assert shape is not None
        k = len(shape) - p.dim()
        if k < 0 or (k == 0 and p.shape[0] != 1):
            ok = False
            break
        v = p.reshape((1,) * k + tuple(p.shape)) if k else p
        subs[id(p)] = v.expand(b, *v.shape[1:])
    if ok:
        def sub(t: Any) -> Any:
            return subs.get(id(t), t) if isinstance(t, Tensor) else t

        try:  # (an in-place op checks broadcasting before it writes)
            out1 = func(*tree_map(sub, args), **tree_map(sub, kwargs))
        except Exception:  # the op does not take a batched parameter: fallback for it
            ok = False
        else:
            ok = isinstance(out1, Tensor) and out1.shape == shape
    if not ok:
        rec.free_bad.update(id(p) for p in params)
        return func(*args, **kwargs) if out0 is None else out0
    for p in params:
        rec.free_ok.add(id(p))
        rec.add(Use(rec.names.get(id(p), "?"), [get_gradient_edge(subs[id(p)])],
                    free_compute(rec, p), [], frozenset({id(p)})))
    return out1


def free_compute(rec: Recorder, p: Tensor) -> Any:
    """The evaluation of a free parameter's op-level record: ``p``'s per-sample gradient is the
    gradient reaching its batched view (none once any use of ``p`` fell back)."""
    b = rec.batch_size

    def compute(deltas: list[Tensor | None]) -> list[Piece]:
        d = deltas[0]
        if d is None or id(p) in rec.free_bad:  # the fallback covers every use of p
            return []
        return [Piece(p, Dense(d.reshape(b, *p.shape)))]

    return compute
