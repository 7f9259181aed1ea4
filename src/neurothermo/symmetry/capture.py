"""Capture a model's graph for symmetry detection: torch.fx, then torch.dynamo, then block by block.

1. ``torch.fx`` symbolic tracing (fast; torch's own modules stay ``call_module`` leaves).
2. If fx fails (data-dependent Python, e.g. Hugging Face attention masks) or the inputs are keyword
   arguments: ``torch._dynamo.export`` of the model, which runs the Python and records the tensor
   operations. Dynamo inlines every module; calls ``F.linear(x, lin.weight, lin.bias)``,
   ``F.layer_norm``, ``F.group_norm``, ``F.batch_norm`` and ``conv*d`` whose parameters are those of one
   torch module are turned back into ``call_module`` nodes, and graph attributes are renamed to the
   model's own parameter names, so the rest of detection sees the same graph as with fx.
3. If both fail, every child module is captured on its own (with the inputs it received in one
   forward pass), recursing into children of the blocks that fail; the blocks that stay opaque are
   reported with the reason.

Inputs are a tensor, a tuple of tensors (positional arguments) or a mapping of tensors (keyword
arguments, e.g. a tokenizer's ``BatchEncoding``; the batch on the leading axis).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from neurothermo._state import preserved_state
from neurothermo.symmetry.trace import (
    Traced,
    UntraceableModelError,
    _get_attr,
    annotate,
    trace_model,
)

Args = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Block:
    """One part of the model and how detection saw it.

    ``path``: qualified module name (``""``: the whole model); ``status``: ``"analysed"`` (its graph
    was captured and searched), ``"opaque"`` (not searched: ``reason`` says why) or ``"split"``
    (not captured as a whole: its children were captured separately); ``how``: ``"fx"`` or
    ``"dynamo"`` for analysed blocks.

    Attributes:
        path: the qualified module name (``""``: the whole model).
        status: ``"analysed"``, ``"opaque"`` or ``"split"``.
        how: ``"fx"`` or ``"dynamo"`` for analysed blocks, else ``""``.
        reason: why an opaque block was not searched.
    """

    path: str
    status: str
    how: str = ""
    reason: str = ""

    def __str__(self) -> str:
        name = self.path or "(whole model)"
        how = f" via {self.how}" if self.how else ""
        why = f": {self.reason}" if self.reason else ""
        return f"{name}: {self.status}{how}{why}"


@dataclass
class Part:
    """A captured part: its trace and the prefix of its parameter names in the whole model."""

    prefix: str
    traced: Traced


def split_inputs(example_inputs: Any) -> Args:
    """``(args, kwargs)`` from a tensor, a tuple of tensors or a mapping name → tensor."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        kw = dict(example_inputs)
        if not kw or not any(isinstance(v, Tensor) for v in kw.values()):
            raise TypeError("example_inputs mapping must hold tensors (keyword arguments of "
                            "model.forward, batch on the leading axis)")
        return (), kw
    if isinstance(example_inputs, tuple | list) and example_inputs and all(
            isinstance(x, Tensor) for x in example_inputs):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple of tensors (the positional arguments of "
        "model.forward) or a mapping of tensors (its keyword arguments, e.g. a tokenizer's "
        f"output), got {type(example_inputs).__name__}"
    )


def call(model: nn.Module, inputs: Args) -> Any:
    return model(*inputs[0], **inputs[1])


def leaves(out: Any) -> list[Tensor]:
    """The tensors of a model output (tensor, tuple/list, dict or Hugging Face ``ModelOutput``)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in leaves(v)]
    return []


class _Outputs(nn.Module):
    """Returns only the tensors of the model's output (caches and other objects dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        return tuple(leaves(self.model(*args, **kwargs)))


# function → (module classes it implements, index of weight, index of bias, first config arg)
_FUNCTIONAL: dict[Any, tuple[tuple[type, ...], int, int]] = {
    F.linear: ((nn.Linear,), 1, 2),
    F.layer_norm: ((nn.LayerNorm,), 2, 3),
    F.group_norm: ((nn.GroupNorm,), 2, 3),
    F.batch_norm: ((nn.modules.batchnorm._BatchNorm,), 3, 4),
    torch.conv1d: ((nn.Conv1d,), 1, 2), torch.conv2d: ((nn.Conv2d,), 1, 2),
    torch.conv3d: ((nn.Conv3d,), 1, 2),
}
if hasattr(F, "rms_norm"):
    _FUNCTIONAL[F.rms_norm] = ((nn.RMSNorm,), 2, -1)


def _arg(node: fx.Node, i: int, key: str) -> Any:
    if i < 0:
        return None
    return node.args[i] if len(node.args) > i else node.kwargs.get(key)


def _plain(mod: nn.Module, types: tuple[type, ...]) -> nn.Module:
    """``mod`` itself, or for a subclass that overrides ``forward`` (Hugging Face's
    ``ConvNextLayerNorm`` permutes channels-first inputs around the norm, which dynamo has already
    recorded as separate operations) a shallow copy of torch's class sharing its parameters, so
    that replaying the graph runs only the normalisation (or convolution) the call stands for."""
    base: Any = next((c for c in type(mod).__mro__ if c.__module__.startswith("torch.nn")
                      and issubclass(c, types)), None)
    if base is None or type(mod).forward is base.forward:
        return mod
    plain = copy.copy(mod)  # shares ``_parameters`` / ``_buffers``: the same tensors
    plain.__class__ = base
    return plain


def _remodule(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Model parameter names for graph attributes; functional calls back into module calls."""
    names: dict[int, str] = {}
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        names.setdefault(id(t), n)
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            if attr == "weight":
                owners.setdefault(id(p), []).append((path, mod))
    graph = gm.graph
    root: dict[str, Any] = {}
    objs: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            obj = _get_attr(gm, str(node.target))
            node.target = names.get(id(obj), str(node.target))
            root[str(node.target)] = objs[node] = obj
    for node in list(graph.nodes):
        spec = _FUNCTIONAL.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        types, wi, bi = spec
        w, b = _arg(node, wi, "weight"), _arg(node, bi, "bias")
        if not isinstance(w, fx.Node) or w not in objs:
            continue
        match = [(p, m) for p, m in owners.get(id(objs[w]), []) if isinstance(m, types)]
        bias_obj = objs.get(b) if isinstance(b, fx.Node) else b
        match = [(p, m) for p, m in match if getattr(m, "bias", None) is bias_obj]
        if not match:
            continue
        path, mod = match[0]
        with graph.inserting_before(node):
            new = graph.create_node("call_module", path, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        root[path] = _plain(mod, types)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            root.pop(str(node.target), None)
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) not in root:
            root[str(node.target)] = model.get_submodule(str(node.target))
    graph._codegen = fx.graph.CodeGen()
    return fx.GraphModule(root, graph)


def dynamo_trace(model: nn.Module, inputs: Args) -> Traced:
    """Capture with ``torch._dynamo.export`` and annotate shapes (see the module docstring)."""
    import torch._dynamo as dynamo
    import torch.utils._pytree as pytree

    args, kwargs = inputs
    with preserved_state(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gm, _ = dynamo.export(_Outputs(model))(*args, **kwargs)
        except Exception as err:  # no dynamo.reset(): it would drop the caller's compiled code
            raise UntraceableModelError(
                f"torch.dynamo cannot capture {type(model).__name__}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}") from err
    flat = pytree.tree_leaves((args, kwargs))
    try:
        gm = _remodule(gm, model)
        holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(holders) != len(flat):
            raise RuntimeError(f"captured {len(holders)} inputs, expected {len(flat)}")
        # ShapeProp prints the traceback of a failing node to stderr: the message below says it
        with preserved_state(model), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*flat)
    except Exception as err:
        raise UntraceableModelError(
            f"the graph torch.dynamo captured of {type(model).__name__} cannot be replayed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return annotate(model, gm)


def _record(model: nn.Module, inputs: Args) -> dict[str, Args]:
    """The inputs every submodule receives in one forward pass (first call; no_grad)."""
    seen: dict[str, Args] = {}

    def hook(path: str) -> Callable[..., None]:
        def save(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.setdefault(path, (tuple(args), dict(kwargs)))
        return save

    handles = [m.register_forward_pre_hook(hook(p), with_kwargs=True)
               for p, m in model.named_modules() if p]
    try:
        with preserved_state(model), torch.no_grad():
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _as_positional(model: nn.Module, inputs: Args) -> tuple[Tensor, ...] | None:
    """The inputs as positional tensors, if keyword inputs are the first parameters of
    ``forward`` in order (``{"x": x}`` for ``forward(self, x, mask=None)``); else None."""
    args, kwargs = inputs
    if not kwargs:
        return args if all(isinstance(a, Tensor) for a in args) else None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    names = [p.name for p in params[len(args): len(args) + len(kwargs)]]
    if sorted(names) != sorted(kwargs) or not all(isinstance(v, Tensor) for v in kwargs.values()):
        return None
    return (*args, *(kwargs[n] for n in names))


def _short(err: BaseException) -> str:
    return str(err).split(". torch.fx traces")[0].splitlines()[0][:300]


def _has_params(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters())


def capture(
    model: nn.Module, inputs: Args, leaf_modules: Sequence[type | str] = (),
    note: Callable[[str], None] | None = None,
) -> tuple[list[Part], list[Block]]:
    """The model's parts with their traces, and the report of what was analysed.

    Raises :class:`UntraceableModelError` (the first failure's message) if no part of the model
    could be captured.
    """
    parts: list[Part] = []
    blocks: list[Block] = []
    first = _capture_into("", model, inputs, leaf_modules, parts, blocks, note)
    if not parts:
        raise first or UntraceableModelError(f"no part of {type(model).__name__} could be captured")
    return parts, blocks


def _capture_into(
    prefix: str, model: nn.Module, inputs: Args, leaves: Sequence[type | str],
    parts: list[Part], blocks: list[Block], note: Callable[[str], None] | None,
) -> UntraceableModelError | None:
    label = prefix.rstrip(".")
    fx_err: UntraceableModelError | None = None
    positional = _as_positional(model, inputs)
    if positional is not None:
        try:
            parts.append(Part(prefix, trace_model(model, positional, leaves)))
            blocks.append(Block(label, "analysed", "fx"))
            return None
        except UntraceableModelError as err:
            fx_err = err
    if note:
        note(f"capturing {label or 'the model'} with torch.dynamo" +
             (f" (torch.fx failed: {_short(fx_err)})" if fx_err else ""))
    try:
        parts.append(Part(prefix, dynamo_trace(model, inputs)))
        blocks.append(Block(label, "analysed", "dynamo",
                            f"torch.fx failed: {_short(fx_err)}" if fx_err else ""))
        return None
    except UntraceableModelError as err:
        dyn_err = err
    first = fx_err or dyn_err
    why = f"{_short(first)}; torch.dynamo: {_short(dyn_err)}" if fx_err else _short(dyn_err)
    try:
        seen = _record(model, inputs)
    except Exception as err:  # the model does not even run on these inputs
        raise UntraceableModelError(
            f"{type(model).__name__} failed on example_inputs: {type(err).__name__}: {err}. "
            "Check that example_inputs are valid inputs of model.forward.") from err
    if note:
        note(f"capturing {label or 'the model'} block by block")
    if fx_err is not None and positional is not None:
        # fx with every failing submodule opaque, each then captured alone
        auto: list[type | str] = list(leaves)
        tr = None
        for _ in range(64):
            try:
                tr = trace_model(model, positional, auto)
                break
            except UntraceableModelError as err:
                if not err.module_path or err.module_path in auto:
                    break
                auto.append(err.module_path)
        opaque = [str(a) for a in auto[len(leaves):]]
        if tr is not None:
            parts.append(Part(prefix, tr))
            blocks.append(Block(label, "analysed", "fx", f"with {', '.join(opaque)} opaque"))
            for path in opaque:
                sub = model.get_submodule(path)
                if path in seen and _has_params(sub):
                    _capture_into(f"{prefix}{path}.", sub, seen[path], (), parts, blocks, note)
            return first
    kids = [(n, c) for n, c in model.named_children() if n in seen and _has_params(c)]
    if not kids:
        blocks.append(Block(label, "opaque", reason=why))
        return first
    blocks.append(Block(label, "split", reason=why))
    for name, child in kids:
        _capture_into(f"{prefix}{name}.", child, seen[name], (), parts, blocks, note)
    return first
