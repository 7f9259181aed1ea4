"""``find_symmetries``: trace, follow every layer's units, build candidates, verify, explain."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, overload

from torch import Tensor, nn

from neurothermo._validate import check_int, check_positive
from neurothermo.symmetry.base import ParamSlice, Symmetry
from neurothermo.symmetry.bilinear import bilinear_pairs
from neurothermo.symmetry.capture import Block, Part, capture, split_inputs
from neurothermo.symmetry.checking import Cand, Rejection, verify_candidates
from neurothermo.symmetry.flow import Flow, find_producers, walk_all
from neurothermo.symmetry.gated import gated_pairs
from neurothermo.symmetry.progress import Progress, ProgressArg
from neurothermo.symmetry.recurrent import inner_symmetries
from neurothermo.symmetry.reentry import merge_calls
from neurothermo.symmetry.rotation import attention_symmetries
from neurothermo.symmetry.scale import weight_norm_symmetry
from neurothermo.symmetry.trace import Traced


@dataclass(frozen=True)
class SymmetryReport:
    """What :func:`find_symmetries` found and what it left out (``explain=True``).

    Iterating over it, or ``len`` of it, goes over ``symmetries``.

    Attributes:
        symmetries: the verified symmetries (:class:`Symmetry`).
        changes: each one's verified relative output change, in the same order. For an
            approximate symmetry this is the change with every normalisation's eps → 0 (the
            check that makes it a symmetry in that limit); its breaking at the model's own eps
            is :attr:`Symmetry.breaking`. The printed report names both.
        rejected: the patterns left out, with reasons (:class:`Rejection`).
        blocks: the parts of the model and how detection saw each (:class:`Block`).
    """

    symmetries: tuple[Symmetry, ...]
    changes: tuple[float, ...]
    rejected: tuple[Rejection, ...]
    blocks: tuple[Block, ...] = ()

    def __iter__(self) -> Iterator[Symmetry]:
        return iter(self.symmetries)

    def __len__(self) -> int:
        return len(self.symmetries)

    @property
    def approximate(self) -> tuple[Symmetry, ...]:
        """The symmetries that hold only up to a measured breaking (``exact=False``)."""
        return tuple(s for s in self.symmetries if not s.exact)

    @property
    def opaque(self) -> tuple[Block, ...]:
        """The parts of the model that were not searched (with the reason)."""
        return tuple(b for b in self.blocks if b.status == "opaque")

    def __str__(self) -> str:
        n_apx = len(self.approximate)
        lines = [f"{len(self.symmetries)} symmetries (verified; {n_apx} approximate):"]
        lines += [f"  {s}   [max output change {c:.1e}{'' if s.exact else ' with eps → 0'}]"
                  for s, c in zip(self.symmetries, self.changes)]
        lines.append(f"{len(self.rejected)} patterns not reported:")
        lines += [f"  {r}" for r in self.rejected]
        lines.append("graph capture:")
        lines += [f"  {b}" for b in self.blocks]
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


def _grouped(tr: Traced, s: ParamSlice, groups: int) -> ParamSlice:
    """Slice ``s`` (rows = channels) read as ``groups`` units of consecutive channels."""
    shape = tuple(tr.model.get_parameter(s.name).shape)
    return ParamSlice(s.name, s.role, 0, view=(groups, shape[0] // groups, *shape[1:]))


def _decide_scale(tr: Traced, f: Flow) -> list[Symmetry]:
    p, n = f.producer, f.producer.n
    if not all(ok for _, _, ok in f.norms) or any(not c[2] for c in f.consumers):
        return []
    whole = any(kind == "whole" for _, kind, _ in f.norms)
    group = any(kind == "group" for _, kind, _ in f.norms) and not whole
    sl = tuple(ParamSlice(s.name, "in", None) if whole else
               _grouped(tr, s, f.groups) if group else s for s in p.cov + f.cov if s.role == "in")
    norms = ", ".join(dict.fromkeys(name for name, _, _ in f.norms))
    what = ("one scale for all" if whole else f"{f.groups} groups of {n // f.groups} "
            "channels" if group else f"{n} units")
    units = 1 if whole else f.groups if group else n
    return [Symmetry("scale", f"{p.name} → {norms} ({what})", sl, units, whole=whole)]


def _decide(tr: Traced, f: Flow) -> tuple[list[Symmetry], list[Rejection]]:
    p = f.producer
    if f.blockers and not (f.blocked_normed and f.norms):
        return [], [Rejection(p.name, f.blockers[0])]
    if f.blockers:  # blocked after a normalisation: only the scale symmetry survives
        return _decide_scale(tr, f), [Rejection(p.name, f.blockers[0])]
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
            found += _decide_scale(tr, f)
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
            sign = p.sign_cov + f.cov if p.sign_cov is not None else cov
            found.append(Symmetry("sign_flip", loc, tuple(sign + contra), n))
    if "perm" in f.classes and "gl" not in f.classes and not p.diag and n >= 2:
        every = [s for c in f.consumers for s in c[1]]
        found.append(Symmetry("permutation", loc, tuple(cov + f.passive + every), n))
    return found, rej


def _structural_problem(tr: Traced, sym: Symmetry, calls: int = 1) -> str | None:
    """Tied/shared or frozen weights; ``calls``: the pattern was found once inside each of that
    many calls of a shared module (``reentry.py``), which then may use each parameter once."""
    for name in sym.param_names:
        k = tr.uses.get(tr.canonical.get(id(tr.model.get_parameter(name)), name), 0)
        if k > calls:
            return (f"parameter '{name}' is used by {k} operations (tied/shared weights) and the "
                    "pattern is not found the same way once inside each of them: one group "
                    "element would have to act on it in two incompatible ways")
    if sym.has_charge:
        for name in sym.param_names:
            if not tr.model.get_parameter(name).requires_grad:
                return (f"parameter '{name}' is frozen (requires_grad=False): the group moves it "
                        "but training does not, so the charge is not conserved")
    return None


_NORM = nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm | nn.RMSNorm


def _eps_of(tr: Traced, names: list[str]) -> str:
    """``"eps=1e-05 of 'bn1'"`` for the normalisations among ``names`` with ``eps > 0``."""
    found = []
    for n in dict.fromkeys(names):
        mod: Any = tr.model.get_submodule(n)
        if isinstance(mod, _NORM) and (mod.eps is None or mod.eps > 0):
            found.append(f"eps={mod.eps if mod.eps is not None else 'dtype eps'} of '{n}'")
    return ", ".join(found)


def _prefixed(sym: Symmetry, prefix: str) -> Symmetry:
    if not prefix:
        return sym
    sl = tuple(replace(x, name=prefix + x.name) for x in sym.slices)
    return replace(sym, slices=sl, location=f"{prefix}{sym.location}")


def _candidates(k: int, part: Part) -> tuple[list[Cand], list[Rejection]]:
    tr, prefix = part.traced, part.prefix
    flows = [f for p in find_producers(tr) for f in walk_all(tr, p)]
    order = {node: i for i, node in enumerate(tr.gm.graph.nodes)}
    cands: list[Cand] = []
    rejected: list[Rejection] = []
    for f in flows:
        found, rej = _decide(tr, f)
        eps = _eps_of(tr, [name for name, _, _ in f.norms])
        norms = [(prefix + name, kind) for name, kind, _ in f.norms]
        sites = frozenset(f.reached)
        cands += [Cand((k, order[f.producer.node]), s, eps, norms, sites) if s.kind == "scale"
                  and eps else Cand((k, order[f.producer.node]), s, sites=sites) for s in found]
        rejected += rej
    pairs, rej = bilinear_pairs(tr, flows)
    cands += [Cand((k, order[flows[i].producer.node]), s, sites=at, calls=c)
              for i, s, at, c in pairs]
    gated, rej2 = gated_pairs(flows)
    cands += [Cand((k, order[flows[i].producer.node]), s, sites=at) for i, s, at in gated]
    rejected += rej + rej2
    for node in tr.gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = tr.gm.get_submodule(str(node.target))
        extra: list[Symmetry] = []
        if isinstance(mod, nn.MultiheadAttention):
            extra += attention_symmetries(str(node.target), mod)
        if isinstance(mod, nn.RNNBase):
            extra += inner_symmetries(str(node.target), mod)
        wn = weight_norm_symmetry(str(node.target), mod)
        if wn is not None:
            extra.append(wn)
        cands += [Cand((k, order[node]), s, sites=frozenset({node})) for s in extra]
    cands = merge_calls(tr, cands)
    kept = []
    for c in cands:
        problem = _structural_problem(tr, c.sym, c.calls)
        if problem:
            rejected.append(Rejection(prefix + c.sym.location, problem, c.sym.kind))
        else:
            kept.append(replace(c, sym=_prefixed(c.sym, prefix)))
    if prefix:
        rejected = [replace(r, location=prefix + r.location) for r in rejected]
    return kept, rejected


Inputs = Tensor | tuple[Tensor, ...] | Mapping[str, Any]


def _check_finite(model: nn.Module, inputs: object) -> None:
    """NaN/Inf inputs or weights would make every verification fail and return [] silently."""
    import torch

    from neurothermo._validate import all_finite, check_finite_params

    if isinstance(model, nn.Module):  # other types are refused by the checks that follow
        check_finite_params(model)
    if isinstance(inputs, tuple | list):
        vals: list[object] = list(inputs)
    elif hasattr(inputs, "keys") and hasattr(inputs, "values"):
        vals = list(inputs.values())  # a dict or a BatchEncoding
    else:
        vals = [inputs]
    for i, t in enumerate(vals):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not all_finite(t):
            raise ValueError(f"example input {i} contains NaN or Inf; the symmetry check needs "
                             "finite inputs (replace or drop those samples)")


@overload
def find_symmetries(
    model: nn.Module, example_inputs: Inputs, *,
    explain: Literal[False] = False, tol: float | None = None,
    leaf_modules: Sequence[type | str] = (), trials: int = 3,
    approx_tol: float | None = 1e-2, progress: ProgressArg = None,
) -> list[Symmetry]: ...


@overload
def find_symmetries(
    model: nn.Module, example_inputs: Inputs, *,
    explain: Literal[True], tol: float | None = None,
    leaf_modules: Sequence[type | str] = (), trials: int = 3,
    approx_tol: float | None = 1e-2, progress: ProgressArg = None,
) -> SymmetryReport: ...


def find_symmetries(
    model: nn.Module, example_inputs: Inputs, *,
    explain: bool = False, tol: float | None = None,
    leaf_modules: Sequence[type | str] = (), trials: int = 3,
    approx_tol: float | None = 1e-2, progress: ProgressArg = None,
) -> list[Symmetry] | SymmetryReport:
    """Find the model's rescale, scale, double-rotation, permutation and sign-flip symmetries.

    Captures the model's graph (torch.fx; torch.dynamo when fx fails or the inputs are keyword
    arguments; block by block when both fail — see ``capture.py``), follows every layer's units
    and keeps a candidate only if random group elements change the outputs by at most ``tol``
    (default: 1e-10 in float64, 1e-5 in float32; relative Frobenius change, max over ``trials``
    draws). ``example_inputs``: a tensor, a tuple of tensors (positional arguments of
    ``forward``) or a mapping of tensors (keyword arguments, e.g. a Hugging Face
    ``BatchEncoding`` with ``input_ids`` and ``attention_mask``); they also serve for the check.

    Symmetries are searched in the model's *current* mode (BatchNorm removes scale only in train
    mode). Scale symmetries of normalisations with ``eps > 0`` hold only up to O(eps/variance):
    such a candidate is kept as *approximate* (``exact=False``, ``breaking`` = its measured output
    change) if it is exact in the ``eps → 0`` limit (checked with every eps set to the dtype's
    smallest normal number) and its breaking at the model's eps is ≤ ``approx_tol``
    (``None``: reject them). A pattern that looks symmetric but is not (residual add across the
    units, tied or frozen weights, BatchNorm in eval mode, biases that do not transform) is left
    out; with ``explain=True`` the result is a :class:`SymmetryReport` listing why, and which
    blocks of the model were analysed or stayed opaque. Modules in ``leaf_modules`` (classes or
    qualified names) are not traced into. Linear links report one ``double_rotation``; attention
    (``nn.MultiheadAttention``, ``q·kᵀ`` / ``softmax(·)·v`` or ``scaled_dot_product_attention``
    through separate or fused q/k/v projections) gives per-head pairs, and grouped-query
    attention one value–output pair per shared value head; recurrent layers give
    hidden-unit permutations and sign flips. ``progress``: see ``progress.py`` (default: lines
    on stderr once detection has taken a second).

    Candidates are verified together (a composition of symmetries is a symmetry); a group that
    fails is split in halves, so the cost is a few forward passes plus ``O(log n)`` per false
    candidate and ``trials`` per approximate one.

    Args:
        model: the network, searched in its current train/eval mode. Left unchanged.
        example_inputs: a tensor, a tuple of tensors (positional arguments) or a mapping of
            tensors (keyword arguments); used for the capture and the numerical check.
        explain: return a :class:`SymmetryReport` (with the rejected patterns and the blocks
            analysed) instead of the list.
        tol: the largest relative output change a verified symmetry may cause (> 0); None for
            1e-10 in float64, 1e-5 in float32.
        leaf_modules: module classes or qualified names not to trace into.
        trials: random group elements drawn per verification (≥ 1).
        approx_tol: the largest breaking an approximate (``eps > 0``) symmetry may have (> 0);
            None to reject approximate symmetries.
        progress: None (lines on stderr once detection has taken a second), True / False
            (always / never), or a callable that receives the lines instead of stderr.

    Returns:
        The verified symmetries (a list of :class:`Symmetry`), or a :class:`SymmetryReport`
        when ``explain=True``.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``example_inputs`` not tensors, non-number
            ``tol`` / ``approx_tol``, a non-int ``trials``, a ``progress`` of another type.
        ValueError: ``tol`` or ``approx_tol`` ≤ 0, ``trials`` < 1, inputs with NaN/Inf.
        FloatingPointError: non-finite parameters.
        UntraceableModelError: no part of the model could be captured, or the model fails on
            ``example_inputs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> sorted({s.kind for s in nt.find_symmetries(model, x[:4])})
        ['permutation', 'rescale']
    """
    trials = check_int("trials", trials)
    _check_finite(model, example_inputs)
    if tol is not None:
        tol = check_positive("tol", tol)
    if approx_tol is not None:
        approx_tol = check_positive("approx_tol", approx_tol)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = split_inputs(example_inputs)
    prog = Progress(progress, "find_symmetries")
    try:
        prog("capturing the graph")
        parts, blocks = capture(model, inputs, leaf_modules, note=prog)
        prog("following the units of every layer")
        cands: list[Cand] = []
        rejected: list[Rejection] = []
        for k, part in enumerate(parts):
            c, r = _candidates(k, part)
            cands += c
            rejected += r
        kept = verify_candidates(model, inputs, cands, rejected, tol, approx_tol, trials, prog)
    finally:
        prog.close("done")
    kept.sort(key=lambda x: x[0])
    syms = [s for _, s, _ in kept]
    if explain:
        return SymmetryReport(tuple(syms), tuple(c for _, _, c in kept), tuple(rejected),
                              tuple(blocks))
    return syms


