"""``find_symmetries``: trace, follow every layer's units, build candidates, verify, explain."""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, overload

from torch import Tensor, nn

from neurothermo._validate import check_int, check_positive
from neurothermo.symmetry.base import ParamSlice, Symmetry
from neurothermo.symmetry.flow import Flow, find_producers, walk
from neurothermo.symmetry.rotation import attention_symmetries
from neurothermo.symmetry.scale import weight_norm_symmetry
from neurothermo.symmetry.trace import Traced, trace_model
from neurothermo.symmetry.verify import default_tolerance, verify_symmetry


@dataclass(frozen=True)
class Rejection:
    """A pattern that is not reported, and why (``change``: measured output change, if tested)."""

    location: str
    reason: str
    kind: str | None = None
    change: float | None = None

    def __str__(self) -> str:
        kind = f"{self.kind}: " if self.kind else ""
        return f"{kind}{self.location}: {self.reason}"


@dataclass(frozen=True)
class SymmetryReport:
    """What :func:`find_symmetries` found (``symmetries``, each with its verified output change
    in ``changes``) and what it left out (``rejected``, with reasons)."""

    symmetries: tuple[Symmetry, ...]
    changes: tuple[float, ...]
    rejected: tuple[Rejection, ...]

    def __iter__(self) -> Iterator[Symmetry]:
        return iter(self.symmetries)

    def __len__(self) -> int:
        return len(self.symmetries)

    def __str__(self) -> str:
        lines = [f"{len(self.symmetries)} symmetries (verified):"]
        lines += [f"  {s}   [max output change {c:.1e}]" for s, c in zip(self.symmetries, self.changes)]
        lines.append(f"{len(self.rejected)} patterns not reported:")
        lines += [f"  {r}" for r in self.rejected]
        return "\n".join(lines)


def _units(n: int, block: int) -> str:
    if block and block < n:
        return f"{n // block} heads × {block}"
    return f"{n} unit" + ("s" if n != 1 else "")


def _path(f: Flow, consumers: list[str]) -> str:
    steps = [f.producer.name]
    for s in f.path:
        if s != steps[-1] and s not in ("identity", "matmul"):
            steps.append(s)
    if consumers:
        steps.append(consumers[0] if len(consumers) == 1 else "{" + ", ".join(consumers) + "}")
    return " → ".join(steps)


def _decide(f: Flow) -> tuple[list[Symmetry], list[Rejection]]:
    p = f.producer
    if f.blockers:
        return [], [Rejection(p.name, f.blockers[0])]
    if f.bilinear or not (f.consumers or f.norms):
        return [], []
    pre = [c for c in f.consumers if not c[2]]
    cov = p.cov + f.cov
    contra = [s for c in pre for s in c[1]]
    n, block = p.n, f.block or p.n
    loc = f"{_path(f, [c[0] for c in f.consumers])} ({_units(n, f.block)})"
    found: list[Symmetry] = []
    rej = [Rejection(f"{p.name} → {bn}", why, "scale") for bn, why in f.eval_norms]
    if f.norms:
        if pre:
            rej.append(Rejection(loc, f"its units are normalised by '{f.norms[0][0]}' but also "
                                      f"used directly by '{pre[0][0]}'", "scale"))
        elif all(ok for _, _, ok in f.norms):
            whole = any(kind == "whole" for _, kind, _ in f.norms)
            sl = tuple(ParamSlice(s.name, "in", None) if whole else s
                       for s in cov if s.role == "in")
            norms = ", ".join(dict.fromkeys(name for name, _, _ in f.norms))
            what = "one scale for all" if whole else f"{n} units"
            found.append(Symmetry("scale", f"{p.name} → {norms} ({what})", sl,
                                  1 if whole else n, whole=whole))
        else:
            rej.append(Rejection(loc, f.lost.get("rescale", "not positively homogeneous"), "scale"))
    elif "gl" in f.classes and not p.diag:
        found.append(Symmetry("double_rotation", loc, tuple(cov + contra), n, block))
    else:
        if f.linear and not p.diag and "gl" in f.lost:
            rej.append(Rejection(loc, f.lost["gl"], "double_rotation"))
        if f.classes & {"rescale", "gl"}:
            found.append(Symmetry("rescale", loc, tuple(cov + contra), n))
        elif (not f.linear or p.diag) and not f.eval_norms:
            rej.append(Rejection(loc, f.lost.get("rescale", "not positively homogeneous"),
                                 "rescale"))
        if "sign" in f.classes and not p.diag:
            found.append(Symmetry("sign_flip", loc, tuple(cov + contra), n))
    if "perm" in f.classes and "gl" not in f.classes and not p.diag and n >= 2:
        every = [s for c in f.consumers for s in c[1]]
        found.append(Symmetry("permutation", loc, tuple(cov + f.passive + every), n))
    return found, rej


def _pairs(flows: list[Flow]) -> tuple[list[tuple[int, Symmetry]], list[Rejection]]:
    """Attention-style bilinear contractions ``q·kᵀ`` of two producers' units."""
    at: dict[object, list[tuple[int, Flow, str]]] = defaultdict(list)
    for i, f in enumerate(flows):
        if not f.blockers:
            for node, side in f.bilinear:
                at[node].append((i, f, side))
    found, rej = [], []
    for items in at.values():
        a = [(i, f) for i, f, s in items if s == "A"]
        b = [(i, f) for i, f, s in items if s == "B"]
        problem = ""
        if len(a) != 1 or len(b) != 1:
            problem = "contracted with a tensor that is not the units of exactly one other layer"
        else:
            (ia, fa), (_, fb) = a[0], b[0]
            for f in (fa, fb):
                if len(f.bilinear) != 1 or f.consumers or f.norms:
                    problem = f"'{f.producer.name}' is also used elsewhere"
                elif "gl" not in f.classes:
                    problem = f"'{f.producer.name}': {f.lost.get('gl', 'nonlinear path')}"
            if not problem and (fa.producer.n, fa.block) != (fb.producer.n, fb.block):
                problem = "the two sides have different head layouts"
            if not problem:
                n, blk = fa.producer.n, fa.block or fa.producer.n
                sl = fa.producer.cov + fa.cov + [replace(s, role="out") for s in fb.producer.cov + fb.cov]
                loc = f"{fa.producer.name} · {fb.producer.name}ᵀ ({_units(n, fa.block)})"
                found.append((ia, Symmetry("double_rotation", loc, tuple(sl), n, blk)))
        if problem:
            names = " · ".join(f.producer.name for _, f, _ in items)
            rej.append(Rejection(names, problem, "double_rotation"))
    return found, rej


def _structural_problem(tr: Traced, sym: Symmetry) -> str | None:
    for name in sym.param_names:
        k = tr.uses.get(name, 0)
        if k > 1:
            return (f"parameter '{name}' is used by {k} operations (tied/shared weights): one "
                    "group element would have to act on it in two incompatible ways")
    if sym.has_charge:
        for name in sym.param_names:
            if not tr.model.get_parameter(name).requires_grad:
                return (f"parameter '{name}' is frozen (requires_grad=False): the group moves it "
                        "but training does not, so the charge is not conserved")
    return None


def _hint(tr: Traced, sym: Symmetry) -> str:
    names = set(re.split(r"[\s→,{}()·]+", sym.location))
    eps = [(n, m.eps) for n, m in tr.model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.RMSNorm)
           and n in names and (m.eps is None or m.eps > 0)]
    if sym.kind == "scale" and eps:
        return (f" ('{eps[0][0]}' has eps={eps[0][1]}: scale invariance holds only up to "
                "O(eps/variance); set eps=0 for an exact symmetry or pass a looser tol)")
    return ""


@overload
def find_symmetries(
    model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...], *,
    explain: Literal[False] = False, tol: float | None = None,
    leaf_modules: Sequence[type | str] = (), trials: int = 3,
) -> list[Symmetry]: ...


@overload
def find_symmetries(
    model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...], *,
    explain: Literal[True], tol: float | None = None,
    leaf_modules: Sequence[type | str] = (), trials: int = 3,
) -> SymmetryReport: ...


def find_symmetries(
    model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...], *,
    explain: bool = False, tol: float | None = None,
    leaf_modules: Sequence[type | str] = (), trials: int = 3,
) -> list[Symmetry] | SymmetryReport:
    """Find the model's rescale, scale, double-rotation, permutation and sign-flip symmetries.

    Traces ``model`` with torch.fx (``example_inputs``: the positional arguments of ``forward``;
    they also serve for the numerical check), follows every layer's units, and keeps a candidate
    only if :func:`verify_symmetry` finds an output change ≤ ``tol`` (default: 1e-10 in float64,
    1e-5 in float32) under ``trials`` random group elements. Symmetries are searched in the
    model's *current* mode (BatchNorm removes scale only in train mode). A pattern that looks
    symmetric but is not (residual add across the units, tied or frozen weights, BatchNorm in eval
    mode, biases/offsets that do not transform, normalisations with ``eps > 0``) is left out; with
    ``explain=True`` the result is a :class:`SymmetryReport` that lists why. Modules in
    ``leaf_modules`` (classes or qualified names) are not traced into (opaque to the search).
    Linear links (no nonlinearity) report one ``double_rotation`` (GL(d) contains the per-unit
    rescale, permutation and sign-flip subgroups); ``nn.MultiheadAttention`` and hand-written
    attention (``q·kᵀ``, ``softmax(·)·v`` through separate Linear layers) give per-head pairs.
    """
    trials = check_int("trials", trials)
    if tol is not None:
        tol = check_positive("tol", tol)
    tr = trace_model(model, example_inputs, leaf_modules)
    flows = [walk(tr, p) for p in find_producers(tr)]
    order = {node: i for i, node in enumerate(tr.gm.graph.nodes)}
    cands: list[tuple[int, Symmetry]] = []
    rejected: list[Rejection] = []
    for f in flows:
        found, rej = _decide(f)
        cands += [(order[f.producer.node], s) for s in found]
        rejected += rej
    pairs, rej = _pairs(flows)
    cands += [(order[flows[i].producer.node], s) for i, s in pairs]
    rejected += rej
    for node in tr.gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = tr.gm.get_submodule(str(node.target))
        if isinstance(mod, nn.MultiheadAttention):
            cands += [(order[node], s) for s in attention_symmetries(str(node.target), mod)]
        wn = weight_norm_symmetry(str(node.target), mod)
        if wn is not None:
            cands.append((order[node], wn))
    cands.sort(key=lambda x: x[0])
    kept: list[Symmetry] = []
    changes: list[float] = []
    for _, sym in cands:
        problem = _structural_problem(tr, sym)
        if problem:
            rejected.append(Rejection(sym.location, problem, sym.kind))
            continue
        t = model.get_buffer(sym.slices[0].name) if sym.slices[0].buffer else \
            model.get_parameter(sym.slices[0].name)
        limit = tol if tol is not None else default_tolerance(t.dtype)
        change = verify_symmetry(model, sym, example_inputs, trials=trials)
        if change <= limit:
            kept.append(sym)
            changes.append(change)
        else:
            rejected.append(Rejection(
                sym.location, f"looks like a {sym.kind} symmetry, but random group elements "
                f"change the outputs by {change:.1e} > {limit:.0e}{_hint(tr, sym)}",
                sym.kind, change))
    if explain:
        return SymmetryReport(tuple(kept), tuple(changes), tuple(rejected))
    return kept

