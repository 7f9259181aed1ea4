"""Symmetries inside a module that runs several times in one forward pass (shared across depth).

ALBERT applies one ``AlbertLayer`` at every depth; a hand-written ``y = L(L(x))`` does the same.
Each parameter of the shared module is then *used* by several operations of the graph, one per
call, and every call gives the same candidate again (the walks of the producer at each call
reach the same consumers, as parameter slices). A transformation ``g`` of parameter slices that
leaves the output unchanged when it acts on the operations of one call only, whatever the other
parameters are, does so at every call; acting on all of them at once is the composition of those
per-call transformations (they touch disjoint operations), so it is a symmetry of the model.

The rule (:func:`merge_calls`): copies of one candidate (same kind, same slices with the same
roles, same units) are merged into one symmetry of the model when, for every parameter it moves,
each copy's walk reaches exactly one of that parameter's uses, no two copies reach the same use,
and together they reach all of them. Otherwise every copy stays as it was and is rejected as
acting on tied or shared weights:

* a symmetry that crosses the module's boundary (the shared module's output units rescaled
  against the next consumer, the same module again) reaches two uses of one parameter in one
  walk, and the last call has no copy (its output goes elsewhere);
* a weight tied to another role (a language model head tied to the input embedding) has a use
  that no copy reaches (the embedding lookup).

Use sites are counted as in :func:`~neurothermo.symmetry.trace.count_uses`: a module call, or
each operation reading the parameter (through views).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch.fx as fx

from neurothermo.symmetry.checking import Cand
from neurothermo.symmetry.trace import VIEW_OPS, Traced, op_name


def _op_sites(node: fx.Node) -> set[fx.Node]:
    out: set[fx.Node] = set()
    for user in node.users:
        op = op_name(user)
        if op == "meta":
            continue
        out |= _op_sites(user) if op in VIEW_OPS else {user}
    return out


def use_sites(tr: Traced) -> dict[str, set[fx.Node]]:
    """Parameter name (canonical) → the graph nodes that use it."""
    sites: dict[str, set[fx.Node]] = defaultdict(set)
    for node in tr.gm.graph.nodes:
        if node.op == "call_module":
            mod = tr.gm.get_submodule(str(node.target))
            for _, p in mod.named_parameters(remove_duplicate=False):
                if id(p) in tr.canonical:
                    sites[tr.canonical[id(p)]].add(node)
        elif node.op == "get_attr":
            a = tr.attr(node)
            if a is not None and a[0] == "param":
                sites[a[1]] |= _op_sites(node)
    return dict(sites)


def _canonical(tr: Traced, name: str) -> str:
    return tr.canonical.get(id(tr.model.get_parameter(name)), name)


def _one_per_call(tr: Traced, copies: list[Cand], sites: dict[str, set[fx.Node]]) -> bool:
    """Every moved parameter: one use per copy, each use reached by exactly one copy."""
    for name in copies[0].sym.param_names:
        mine = sites.get(_canonical(tr, name), set())
        hit = [c.sites & mine for c in copies]
        if any(len(h) != 1 for h in hit):
            return False
        if len(set().union(*hit)) != len(copies) or len(mine) != len(copies):
            return False
    return True


def merge_calls(tr: Traced, cands: list[Cand]) -> list[Cand]:
    """``cands`` with the copies of a pattern found once inside each call of a shared module
    merged into one candidate (``calls`` = the number of calls); see the module docstring."""
    groups: dict[object, list[Cand]] = defaultdict(list)
    for c in cands:
        s = c.sym
        groups[(s.kind, s.slices, s.n_units, s.block, s.whole, c.eps)].append(c)
    sites: dict[str, set[fx.Node]] | None = None
    out: list[Cand] = []
    for copies in groups.values():
        shared = any(tr.uses.get(_canonical(tr, n), 0) > 1 for n in copies[0].sym.param_names)
        if len(copies) < 2 or not shared:
            out += copies
            continue
        if sites is None:
            sites = use_sites(tr)
        if _one_per_call(tr, copies, sites):
            first = copies[0]
            every = frozenset().union(*(c.sites for c in copies))
            sym = replace(first.sym, location=f"{first.sym.location} (in each of its "
                                              f"{len(copies)} calls)")
            out.append(Cand(first.order, sym, first.eps, first.norms, every, len(copies)))
        else:
            out += copies
    out.sort(key=lambda c: c.order)
    return out
