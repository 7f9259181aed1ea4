"""Modules whose output every sample shares: per-sample gradients read where it meets the batch.

T5's ``relative_attention_bias`` is an ``nn.Embedding`` called on ``[q_len, k_len]`` position
buckets: its output has no batch axis, and the gradient reaching it is already summed over the
samples, so no hook on the module can give per-sample gradients. But the output, after ops on it
alone (``permute``, ``unsqueeze``, slicing), meets batch tensors in a broadcasting op
(``bias + mask``, ``scores += bias``). There, as for a model's own parameters
(``_capture.Recorder.free_op``), the shared tensor ``d`` is replaced by ``d`` viewed with a
leading axis and expanded to the batch (``d'[i] = d``): the op's result is unchanged, and the
gradient reaching ``d'[i]`` is sample ``i``'s share ``δ_i`` (of the mean loss ``l_B``).

Sample ``i``'s gradient at the module's output ``y`` is then ``Σ_k J_kᵀ δ_{k,i}`` over the meeting
points ``k``, ``J_k`` the Jacobian of the ops from ``y`` to ``d_k``, replayed functionally and
pulled back with ``vmap(vjp)``; and the module's parameters get ``J_θᵀ`` of that, by ``vmap(vjp)``
of the module's forward at its recorded (shared) inputs: ``b × |θ|`` numbers for this module only.
Exact, like the fallback. Used for a recorded call whose output's leading size the layout probe
saw unchanged on ``b'`` samples (``_layout.py``).

Anything else declines (the call's refusal is then raised, naming the module and the way out):
a shared tensor that reaches a recorded module's input, an op with two shared tensors or with a
tuple output, a meeting op whose result changes when the tensor is expanded, an op with batch
tensors whose result is not batch-first (Swin's windows folded into the batch), a shared output
that never meets the batch. An op with the shared tensor and constants only (no tensor that
requires grad or has ``b`` rows) gives a derived shared tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

from neurothermo.gradstats._pieces import Dense, Piece


@dataclass
class Root:
    """A shared call: the module, its recorded inputs, its output ``y``, its meeting points
    ``(edge of the expanded view, chain of ops from y, shape of the shared tensor there)``."""

    module: nn.Module
    name: str
    args: Any
    kwargs: Any
    y: Tensor
    meetings: list[tuple[Any, list[tuple[Any, tuple[Any, ...], dict[str, Any], int]],
                         torch.Size]] = field(default_factory=list)
    bad: str | None = None


@dataclass
class Shared:
    """The shared tensors of one pass: ``derived[id(t)] = (t, root, chain)``."""

    batch_size: int
    roots: list[Root] = field(default_factory=list)
    derived: dict[int, tuple[Tensor, Root, list[Any]]] = field(default_factory=dict)

    def add_root(self, module: nn.Module, name: str, args: Any, kwargs: Any, y: Tensor) -> None:
        root = Root(module, name, args, kwargs, y)
        self.roots.append(root)
        self.derived[id(y)] = (y, root, [])

    def find(self, args: Any, kwargs: dict[str, Any]) -> list[tuple[int, Tensor]]:
        """``(position, tensor)`` of the shared tensors among the op's arguments (top level)."""
        flat = [*args, *kwargs.values()]
        return [(j, t) for j, t in enumerate(flat)
                if isinstance(t, Tensor) and id(t) in self.derived
                and self.derived[id(t)][0] is t]

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
           found: list[tuple[int, Tensor]], writes: bool) -> Any:
        """Run ``func`` with shared arguments ``found``: a meeting point (batch-sized result),
        or a derived shared tensor, or (anything else) the root declines."""
        _, root, chain = self.derived[id(found[0][1])]
        if len(found) > 1 or any(self.derived[id(t)][1] is not root for _, t in found):
            for _, t in found:
                self.derived[id(t)][1].bad = f"'{_fname(func)}' takes two shared tensors"
            return func(*args, **kwargs)
        pos, d = found[0]
        b = self.batch_size
        target = args[0] if args and isinstance(args[0], Tensor) else None
        if writes:
            if target is None or target is d or target._base is not None or "out" in kwargs:
                root.bad = f"'{_fname(func)}' writes in place where the shared tensor meets it"
                return func(*args, **kwargs)
            out0, shape = None, target.shape
        else:
            out0 = func(*args, **kwargs)
            if not isinstance(out0, Tensor):
                root.bad = f"'{_fname(func)}' returns several tensors"
                return out0
            shape = out0.shape
        # batch tensors among the other operands (activations, or the batch's own inputs): only
        # then can the op be where the shared tensor meets the batch; an op on the shared tensor
        # with constants alone gives a derived shared tensor, whatever its shape
        others = [t for j, a in enumerate([*args, *kwargs.values()]) if j != pos
                  for t in (a if isinstance(a, list | tuple) else (a,)) if isinstance(t, Tensor)]
        batchy = any(t.requires_grad or (t.dim() and t.shape[0] == b) for t in others)
        k = len(shape) - d.dim()
        meets = (batchy and len(shape) > 0 and shape[0] == b and k >= 0
                 and (k > 0 or d.shape[0] == 1))
        if meets:
            v = d.reshape((1,) * k + tuple(d.shape)) if k else d
            v = v.expand(b, *v.shape[1:])
            new = _replace(args, kwargs, pos, v)
            try:
                out1 = func(*new[0], **new[1])
            except Exception:
                out1 = None
            if isinstance(out1, Tensor) and out1.shape == shape:
                root.meetings.append((get_gradient_edge(v), list(chain), d.shape))
                return out1
            if writes:  # (an in-place op checks broadcasting before it writes: nothing written)
                root.bad = f"'{_fname(func)}' does not take the shared tensor expanded to the batch"
                return func(*args, **kwargs)
        if writes:
            root.bad = f"'{_fname(func)}' writes into a tensor with the shared one"
            return func(*args, **kwargs)
        assert out0 is not None
        if batchy and len(shape) and shape[0] == b:
            # a batch-first result, but the shared tensor is no broadcast operand of it (a conv
            # or matmul weight): there is no per-sample copy of it to read a share from
            root.bad = (f"it meets the batch in '{_fname(func)}' as an operand that is not "
                        "broadcast over the samples (a weight, say)")
            return out0
        if batchy:
            # batch activations in an op whose result is not batch-first: what follows depends
            # on the samples, so it is not a derived shared tensor, and no share can be read
            root.bad = (f"it meets the batch in '{_fname(func)}', whose result (shape "
                        f"{tuple(out0.shape)}) is not batch-first")
            return out0
        if out0.requires_grad:
            self.derived[id(out0)] = (out0, root, [*chain, (func, args, kwargs, pos)])
        return out0

    def check_inputs(self, leaves: list[Tensor], name: str) -> None:
        """A recorded module reading a shared tensor: its rule would take it for a batch."""
        for t in leaves:
            hit = self.derived.get(id(t))
            if hit is not None and hit[0] is t:
                hit[1].bad = f"module {name!r} takes it as an input"


def _fname(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _replace(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, value: Tensor
             ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if pos < len(args):
        return (*args[:pos], value, *args[pos + 1:]), kwargs
    key = list(kwargs)[pos - len(args)]
    return args, {**kwargs, key: value}


def _replay(chain: list[Any], y: Tensor) -> Tensor:
    t = y
    for func, args, kwargs, pos in chain:
        a, kw = _replace(tuple(args), dict(kwargs), pos, t)
        t = func(*a, **kw)
    return t


def root_pieces(root: Root, deltas: list[Tensor | None], wanted: frozenset[int],
                b: int) -> list[Piece]:
    """Pieces of the root module's own parameters from the meeting points' output gradients."""
    keep = torch.is_grad_enabled()

    def det(t: Tensor) -> Tensor:
        return t if keep else t.detach()

    y = det(root.y)
    dy = None
    for (_, chain, shape), d in zip(root.meetings, deltas):
        if d is None:
            continue
        per = d.reshape(b, *shape)  # sample i's gradient at the shared tensor there
        if chain:
            back = vjp(lambda t, c=chain: _replay(c, t), y)[1]
            per = vmap(lambda g, f=back: f(g)[0])(det(per))
        dy = per if dy is None else dy + per
    params = {n: p for n, p in root.module.named_parameters(recurse=False) if id(p) in wanted}
    if dy is None or not params:
        return []
    args, kwargs = tree_map(lambda t: det(t) if isinstance(t, Tensor) else t,
                            (root.args, root.kwargs))

    def forward(th: dict[str, Tensor]) -> Tensor:
        out = functional_call(root.module, th, tuple(args), kwargs)
        return out if isinstance(out, Tensor) else out[0]

    back = vjp(forward, {n: det(p) for n, p in params.items()})[1]
    grads = vmap(lambda g: back(g)[0])(dy)
    return [Piece(p, Dense(grads[n])) for n, p in params.items()]
