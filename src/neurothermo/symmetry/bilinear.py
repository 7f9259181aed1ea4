"""Double rotations through bilinear contractions ``q·kᵀ`` (attention scores), pairing the
layers whose units meet there.

A bilinear contraction contracts one producer's units (side A) with another's (side B), head by
head, over the units' inner axis: ``Σ_i q_i k_i``. An invertible ``G`` per head acting on one
side's rows as ``q → G·q`` and on the other's as ``k → G⁻ᵀ·k`` leaves it unchanged. When the
units of one layer reach several contractions (DeBERTa: the query meets the keys of the content
and the keys of the relative positions), and one layer runs several times (DeBERTa with
``share_att_key``: the same query and key projections map the hidden states and the relative
position embeddings), the layers form a graph: one vertex per parameter set (all calls of one
layer, or one segment of a fused layer), one edge per contraction.

The rule (:func:`bilinear_pairs`): a connected component of that graph gives one double
rotation when

* every contraction in it has exactly one A and one B side, each the units of one walk,
* every walk in it ends in contractions only (no consumer, normalisation or blocker), along a
  linear path (``gl`` survives), with the same head layout (units, head size),
* the vertices can be 2-coloured so that every contraction joins the two colours — colour X
  transforms by ``G``, colour Y by ``G⁻ᵀ``; each contraction ``x·yᵀ`` is then unchanged,
* every use of every parameter it moves is one of its walks (no call of the layer is left out),
  or a walk that reaches nothing at all (a projection computed and never used).

Each contraction is then invariant, whatever else the model computes from it, and every
operation that reads the moved parameters is one of the walks: the output is unchanged. Two
layers meeting in one contraction (ordinary attention) are the smallest component.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch.fx as fx

from neurothermo.symmetry.base import ParamSlice, Symmetry
from neurothermo.symmetry.checking import Rejection
from neurothermo.symmetry.trace import Traced
from neurothermo.symmetry.units import Flow

Pair = tuple[int, Symmetry, frozenset[Any], int]  # (flow index, symmetry, sites, calls)


def _units(n: int, block: int) -> str:
    if block and block < n:
        return f"{n // block} heads × {block}"
    return f"{n} unit" + ("s" if n != 1 else "")


def _names(v: list[str]) -> str:
    return v[0] if len(v) == 1 else "{" + ", ".join(v) + "}"


def _key(f: Flow) -> frozenset[ParamSlice]:
    """The vertex of a walk: the parameter slices its producer moves (the same for every call)."""
    return frozenset(replace(s, role="in") for s in f.producer.cov + f.cov)


def _components(at: dict[object, list[tuple[int, Flow, str]]]) -> list[list[object]]:
    """Contractions grouped by connected component (through shared vertices)."""
    parent: dict[object, object] = {}

    def find(x: object) -> object:
        while parent.setdefault(x, x) is not x:
            x = parent[x]
        return x

    for node, items in at.items():
        for _, f, _ in items:
            parent[find(("v", _key(f)))] = find(node)
    groups: dict[object, list[object]] = defaultdict(list)
    for node in at:
        groups[find(node)].append(node)
    return list(groups.values())


def _colour(edges: list[tuple[frozenset[ParamSlice], frozenset[ParamSlice]]],
            ) -> dict[frozenset[ParamSlice], bool] | None:
    """A 2-colouring of the vertices with every edge joining the colours (None: none exists)."""
    adj: dict[frozenset[ParamSlice], list[frozenset[ParamSlice]]] = defaultdict(list)
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    colour: dict[frozenset[ParamSlice], bool] = {}
    for start in adj:
        if start in colour:
            continue
        colour[start], todo = True, [start]
        while todo:
            v = todo.pop()
            for w in adj[v]:
                if w not in colour:
                    colour[w] = not colour[v]
                    todo.append(w)
                elif colour[w] == colour[v]:
                    return None
    return colour


def _params(tr: Traced, f: Flow) -> set[str]:
    return {tr.canonical.get(id(tr.model.get_parameter(s.name)), s.name)
            for s in f.producer.cov + f.cov}


def dead(f: Flow) -> bool:
    """The walk reached no sink at all: its units never reach the output (a value computed and
    left unused, e.g. DeBERTa's projected position queries without ``p2c``)."""
    return not (f.blockers or f.consumers or f.norms or f.bilinear or f.fused
                or f.gate is not None)


def _uses_covered(tr: Traced, flows: list[Flow], unused: list[Flow]) -> tuple[str, int]:
    """``(problem, calls)``: every use of every moved parameter must be one of the walks, or a
    walk whose units are never used (``unused``: transforming them changes nothing)."""
    nodes: dict[str, set[fx.Node]] = defaultdict(set)
    for f in flows:
        for name in _params(tr, f):
            nodes[name].add(f.producer.node)
    for f in unused:
        for name in _params(tr, f) & set(nodes):
            nodes[name].add(f.producer.node)
    calls = 1
    for name, mine in nodes.items():
        k = tr.uses.get(name, 0)
        if k != len(mine):
            return (f"parameter '{name}' is used by {k} operations, of which {len(mine)} reach "
                    "these contractions only"), 1
        calls = max(calls, k)
    return "", calls


def _component(tr: Traced, nodes: list[object], at: dict[object, list[tuple[int, Flow, str]]],
               unused: list[Flow]) -> tuple[Pair | None, str]:
    edges = []
    for node in nodes:
        items = at[node]
        a = [f for _, f, s in items if s == "A"]
        b = [f for _, f, s in items if s == "B"]
        if len(a) != 1 or len(b) != 1:
            return None, "contracted with a tensor that is not the units of exactly one other layer"
        edges.append((_key(a[0]), _key(b[0])))
    members = {id(f): (i, f) for node in nodes for i, f, _ in at[node]}
    flows = [f for _, f in sorted(members.values(), key=lambda x: x[0])]
    for f in flows:
        if f.consumers or f.norms:
            return None, f"'{f.producer.name}' is also used elsewhere"
        if "gl" not in f.classes:
            return None, f"'{f.producer.name}': {f.lost.get('gl', 'nonlinear path')}"
    first = flows[0]
    if any((f.producer.n, f.block) != (first.producer.n, first.block) for f in flows):
        return None, "the two sides have different head layouts"
    colour = _colour(edges)
    if colour is None:
        return None, ("the contractions cannot be split into two sides (a layer's units would "
                      "meet their own kind)")
    problem, calls = _uses_covered(tr, flows, unused)
    if problem:
        return None, problem
    x_side = colour[edges[0][0]]  # the A side of the first contraction transforms by G
    sl: dict[ParamSlice, None] = {}
    for f in flows:
        role = "in" if colour[_key(f)] == x_side else "out"
        for s in f.producer.cov + f.cov:
            sl[replace(s, role=role)] = None
    if len({replace(s, role="in") for s in sl}) != len(sl):
        return None, "one parameter would transform on both sides"
    n, blk = first.producer.n, first.block or first.producer.n
    xs = list(dict.fromkeys(f.producer.name for f in flows if colour[_key(f)] == x_side))
    ys = list(dict.fromkeys(f.producer.name for f in flows if colour[_key(f)] != x_side))
    loc = f"{_names(xs)} · {_names(ys)}ᵀ ({_units(n, first.block)})"
    if calls > 1:
        loc += f" (through all {calls} calls)"
    sites = frozenset().union(*(f.reached for f in flows))
    index = min(i for i, _ in members.values())
    return (index, Symmetry("double_rotation", loc, tuple(sl), n, blk), sites, calls), ""


def bilinear_pairs(tr: Traced, flows: list[Flow]) -> tuple[list[Pair], list[Rejection]]:
    """Double rotations through attention-style contractions (see the module docstring)."""
    at: dict[object, list[tuple[int, Flow, str]]] = defaultdict(list)
    for i, f in enumerate(flows):
        if not f.blockers:
            for node, side in f.bilinear:
                at[node].append((i, f, side))
    found: list[Pair] = []
    rej: list[Rejection] = []
    unused = [f for f in flows if dead(f)]
    for nodes in _components(at):
        pair, problem = _component(tr, nodes, at, unused)
        if pair is not None:
            found.append(pair)
        else:
            names = " · ".join(dict.fromkeys(f.producer.name for n in nodes for _, f, _ in at[n]))
            rej.append(Rejection(names, problem, "double_rotation"))
    return found, rej
