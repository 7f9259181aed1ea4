"""Gated units: ``down(act(gate(x)) ⊙ up(x))`` (SwiGLU, GeGLU, ReGLU; used by ``ops.py``/``detect.py``).

Two layers' units meet in an elementwise product ``y = a ⊙ b``. Each factor sees the other as a
tensor that does not transform with its own group, and ``(s·a) ⊙ b = s·(a ⊙ b)`` for a diagonal
``s``: a factor keeps the diagonal classes that reached the product, undone by the consumer's
columns (``÷ s``). For a gated MLP:

* the linear branch (``up``): rows and bias ``× α``, consumer columns ``× 1/α`` (``rescale``,
  ``α > 0``) and the same with ``α = −1`` (``sign_flip``);
* the gate branch through ``act``: only what ``act`` allows — ReLU / leaky ReLU are positively
  homogeneous (``relu(α·z) = α·relu(z)``: a rescale of the gate rows), an odd ``act`` allows a
  sign flip, SiLU / GELU allow neither.

A permutation has to act on both factors at once, ``P·(a ⊙ b) = (P·a) ⊙ (P·b)``: the gate rows,
the up rows and the consumer's columns are permuted together (any elementwise ``act``). It is
reported for the product of two layers' units (or two segments of one fused layer, split with
``chunk``/``split``) with the same layout, at least one factor reaching it linearly (a gated
*linear* unit), and the same consumers after it. When both factors pass through nonlinearities,
or one factor is not another layer's units (a mask, a fixed tensor), the joint permutation is not
reported, and the report says why.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch.fx as fx

from neurothermo.symmetry.base import Symmetry
from neurothermo.symmetry.checking import Rejection
from neurothermo.symmetry.units import _SCALES, Blocked, Flow, Gate, Track, label


def gate_step(flow: Flow, node: fx.Node, operand: int, t: Track, other: str) -> Track:
    """``mul`` of the units with another stream ``other``: the units pass with the diagonal
    classes (``(s·a) ⊙ b = s·(a ⊙ b)``); permutations are left to :func:`gated_pairs`."""
    lbl = label(node)
    if flow.gate is not None:
        raise Blocked(f"'{lbl}' multiplies the units elementwise with '{other}' after "
                      f"'{label(flow.gate.node)}' already gated them")
    perm = "perm" in flow.classes
    flow.restrict(_SCALES, f"'{lbl}' multiplies the units elementwise with '{other}' (a gate "
                             "that is not transformed with them alone)")
    flow.gate = Gate(node, operand, t, flow.linear, perm)
    flow.joint = {"perm"} if perm else set()
    if not flow.classes and not perm:
        raise Blocked(f"'{lbl}' combines the units elementwise with '{other}'")
    flow.path.append(lbl)
    return t


def _factor_problem(f: Flow) -> str:
    p = f.producer.name
    if f.blockers:
        return f"'{p}': {f.blockers[0]}"
    if f.producer.diag:
        return f"'{p}' scales its units one by one (a gain): it cannot permute them"
    if not (f.gate and f.gate.perm):
        return f"'{p}': {f.lost.get('perm', 'not permutation-equivariant')}"
    if "perm" not in f.joint:
        return f"after '{label(f.gate.node)}' the product meets an operation that is not " \
               "permutation-equivariant"
    if f.bilinear or not (f.consumers or f.norms):
        return f"'{p}': the product is not consumed by a layer"
    return ""


def _pair_problem(a: Flow, b: Flow) -> str:
    assert a.gate is not None and b.gate is not None
    lbl = label(a.gate.node)
    problem = _factor_problem(a) or _factor_problem(b)
    if problem:
        return problem
    if not (a.gate.linear or b.gate.linear):
        return (f"both factors of '{lbl}' pass through nonlinearities: not a gated linear unit "
                "(a permutation of the two is not searched)")
    if a.gate.track != b.gate.track or a.producer.n != b.producer.n:
        return f"the two factors of '{lbl}' have different layouts"
    if [c[0] for c in a.consumers] != [c[0] for c in b.consumers] or a.norms != b.norms:
        return f"the two factors of '{lbl}' are also used apart from their product"
    return ""


def _permutation(a: Flow, b: Flow) -> Symmetry:
    """Gate rows, up rows (with what they met on the way) and the consumers' columns, together."""
    assert a.gate is not None
    every = [s for c in a.consumers for s in c[1]]
    slices = dict.fromkeys([*a.producer.cov, *a.cov, *a.passive,
                            *b.producer.cov, *b.cov, *b.passive, *every])
    sinks = [c[0] for c in a.consumers] or [n for n, _, _ in a.norms]
    to = sinks[0] if len(sinks) == 1 else "{" + ", ".join(sinks) + "}"
    n = a.producer.n
    loc = f"{a.producer.name} ⊙ {b.producer.name} → {label(a.gate.node)} → {to} ({n} units)"
    return Symmetry("permutation", loc, tuple(slices), n)


def gated_pairs(
    flows: list[Flow],
) -> tuple[list[tuple[int, Symmetry, frozenset[fx.Node]]], list[Rejection]]:
    """The joint permutations of the two factors of every gated product, by flow index, with
    the nodes the two walks reached."""
    at: dict[fx.Node, list[tuple[int, Flow]]] = defaultdict(list)
    for i, f in enumerate(flows):
        if f.gate is not None:
            at[f.gate.node].append((i, f))
    found: list[tuple[int, Symmetry, frozenset[fx.Node]]] = []
    rejected: list[Rejection] = []
    for node, items in at.items():
        items.sort(key=_operand)
        names = " ⊙ ".join(f.producer.name for _, f in items)
        if len(items) != 2 or items[0][1] is items[1][1] or _operand(items[0]) == _operand(items[1]):
            rejected.append(Rejection(names, f"'{label(node)}' multiplies the units elementwise "
                                      "with a tensor that is not another layer's units (followed "
                                      "up to it): they cannot be permuted alone", "permutation"))
            continue
        (ia, a), (_, b) = items
        problem = _pair_problem(a, b)
        if problem:
            rejected.append(Rejection(names, problem, "permutation"))
        else:
            found.append((ia, _permutation(a, b), frozenset(a.reached | b.reached)))
    return found, rejected


def _operand(item: tuple[int, Flow]) -> Any:
    gate = item[1].gate
    return gate.operand if gate is not None else -1
