"""Trace a model with ``torch.fx`` and annotate every node with its output shape.

Symmetry detection walks this graph (see ``flow.py``). torch's own modules (``nn.Linear``,
``nn.Conv2d``, ``nn.MultiheadAttention``, …) stay opaque leaves; user modules are traced through,
so custom ``forward`` methods calling ``F.relu`` / ``torch.tanh`` / ``@`` are seen op by op.
A model fx cannot trace (Python control flow on tensor values, ``.item()``, numpy calls) raises
:class:`UntraceableModelError` naming the submodule and source line that failed.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import operator
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from neurothermo._state import mha_fastpath_off, preserved_state


class UntraceableModelError(RuntimeError):
    """The model cannot be captured; the message names the failing operation.

    ``module_path``: qualified name of the submodule in which torch.fx failed (``""``: the
    model's own ``forward``)."""

    module_path: str = ""


_TORCH_DIR = str(Path(torch.__file__).parent)
_HERE = str(Path(__file__).parent)

# Canonical names of the functions detection understands.
_FUNCTIONS: dict[Any, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
    operator.neg: "neg", torch.neg: "neg",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    operator.getitem: "getitem", getattr: "getattr",
    F.linear: "linear", F.scaled_dot_product_attention: "sdpa",
    torch.flatten: "reshape", torch.reshape: "reshape", torch.squeeze: "reshape",
    torch.unsqueeze: "reshape", torch.transpose: "transpose", torch.permute: "permute",
    torch.t: "t", torch.swapaxes: "transpose",
    F.dropout: "dropout", F.softmax: "softmax", torch.softmax: "softmax",
    F.log_softmax: "softmax", torch.log_softmax: "softmax",
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.prelu: "prelu", F.hardtanh: "hardtanh",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sin: "sin", torch.atan: "atan",
    torch.asinh: "asinh", torch.sinh: "sinh", torch.erf: "erf", F.softsign: "softsign",
    F.tanhshrink: "tanhshrink", F.hardshrink: "hardshrink", F.softshrink: "softshrink",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.gelu: "gelu", F.silu: "silu",
    F.elu: "elu", F.selu: "selu", F.celu: "celu", F.softplus: "softplus", F.mish: "mish",
    F.relu6: "relu6", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    F.logsigmoid: "logsigmoid", torch.exp: "exp", torch.abs: "abs", torch.square: "square",
    F.max_pool1d: "max_pool", F.max_pool2d: "max_pool", F.max_pool3d: "max_pool",
    F.adaptive_max_pool1d: "max_pool", F.adaptive_max_pool2d: "max_pool",
    F.avg_pool1d: "avg_pool", F.avg_pool2d: "avg_pool", F.avg_pool3d: "avg_pool",
    F.adaptive_avg_pool1d: "avg_pool", F.adaptive_avg_pool2d: "avg_pool",
    F.adaptive_avg_pool3d: "avg_pool",
    torch.addmm: "addmm", operator.pow: "pow", torch.pow: "pow", torch.cat: "cat",
    torch.concat: "cat", torch.split: "split", torch.unbind: "unbind", torch.chunk: "chunk",
    torch.Size: "meta", torch.ops.aten.sym_size.int: "meta", torch.ops.aten.sym_size: "meta",
    torch._C._nn.gelu: "gelu", torch.repeat_interleave: "repeat_interleave",
    torch.clamp: "clamp", torch.clip: "clamp", torch.clamp_min: "clamp_min",
    torch.clamp_max: "clamp_max", torch.mean: "mean", torch.sum: "sum",
    torch.linalg.vector_norm: "vector_norm",
}
_METHODS: dict[str, str] = {
    "view": "reshape", "reshape": "reshape", "flatten": "reshape", "unflatten": "reshape",
    "squeeze": "reshape", "unsqueeze": "reshape", "transpose": "transpose", "swapaxes": "transpose",
    "permute": "permute", "t": "t", "contiguous": "identity", "clone": "identity",
    "float": "identity", "double": "identity", "to": "identity", "type_as": "identity",
    "add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
    "div": "div", "div_": "div", "neg": "neg", "matmul": "matmul", "bmm": "matmul",
    "softmax": "softmax", "log_softmax": "softmax", "size": "meta", "dim": "meta",
    "relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid",
    "exp": "exp", "abs": "abs", "sin": "sin", "square": "square", "pow": "pow",
    "split": "split", "unbind": "unbind", "chunk": "chunk",
    "expand": "expand", "repeat_interleave": "repeat_interleave", "repeat": "repeat",
    "clamp": "clamp", "clip": "clamp", "clamp_min": "clamp_min", "clamp_max": "clamp_max",
    "mean": "mean", "sum": "sum",
}
# Positively homogeneous (rescale), odd (sign flip), merely elementwise (permutation only).
# |a·x| = a·|x| for a > 0: abs is positively homogeneous (even, not odd: no sign flip).
HOMOGENEOUS = {"relu", "leaky_relu", "prelu", "max_pool", "abs"}
ODD = {"tanh", "sin", "atan", "asinh", "sinh", "erf", "softsign", "tanhshrink", "hardshrink",
       "softshrink", "hardtanh"}
ELEMENTWISE = {"pow", "sigmoid", "gelu", "silu", "elu", "selu", "celu", "softplus", "mish", "relu6",
               "hardswish", "hardsigmoid", "logsigmoid", "exp", "square", "softmax"}
VIEW_OPS = {"reshape", "transpose", "permute", "t", "identity", "T"}

_MODULES: list[tuple[type, str]] = [
    (nn.ReLU, "relu"), (nn.LeakyReLU, "leaky_relu"), (nn.PReLU, "prelu"), (nn.Tanh, "tanh"),
    (nn.Softsign, "softsign"), (nn.Tanhshrink, "tanhshrink"), (nn.Hardshrink, "hardshrink"),
    (nn.Softshrink, "softshrink"), (nn.Hardtanh, "hardtanh"), (nn.Sigmoid, "sigmoid"),
    (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.ELU, "elu"), (nn.SELU, "selu"), (nn.CELU, "celu"),
    (nn.Softplus, "softplus"), (nn.Mish, "mish"), (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"), (nn.LogSigmoid, "logsigmoid"), (nn.Identity, "identity"),
    (nn.Dropout, "dropout"), (nn.Dropout1d, "dropout"), (nn.Dropout2d, "dropout"),
    (nn.Dropout3d, "dropout"), (nn.Softmax, "softmax"), (nn.LogSoftmax, "softmax"),
    (nn.Flatten, "reshape"), (nn.Unflatten, "reshape"),
    (nn.MaxPool1d, "max_pool"), (nn.MaxPool2d, "max_pool"), (nn.MaxPool3d, "max_pool"),
    (nn.AdaptiveMaxPool1d, "max_pool"), (nn.AdaptiveMaxPool2d, "max_pool"),
    (nn.AvgPool1d, "avg_pool"), (nn.AvgPool2d, "avg_pool"), (nn.AvgPool3d, "avg_pool"),
    (nn.AdaptiveAvgPool1d, "avg_pool"), (nn.AdaptiveAvgPool2d, "avg_pool"),
    (nn.AdaptiveAvgPool3d, "avg_pool"),
]


def module_op(module: nn.Module) -> str | None:
    """Canonical op name of an elementwise/pooling/reshaping torch module, else None."""
    if isinstance(module, nn.ReLU6):
        return "relu6"
    m: Any = module
    for cls, name in _MODULES:
        if isinstance(module, cls):
            if name == "hardtanh" and m.min_val != -m.max_val:
                return "relu6"  # asymmetric clamp: elementwise, neither odd nor homogeneous
            return name
    return None


def op_name(node: fx.Node) -> str | None:
    """Canonical name of a call_function / call_method node (None if unknown)."""
    if node.op == "call_function":
        try:
            name = _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            name = None
        if name == "getattr" and len(node.args) > 1 and node.args[1] in ("T", "mT"):
            return "t"
        if name == "getattr":
            return "meta"
        return name
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    return None


@dataclass
class Traced:
    """A traced model: graph, output shapes per node, parameter names and use counts."""

    model: nn.Module
    gm: fx.GraphModule
    shapes: dict[fx.Node, tuple[int, ...] | None]
    canonical: dict[int, str]  # id(parameter) → its name in model.named_parameters()
    uses: dict[str, int] = field(default_factory=dict)  # parameter name → operations using it

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        if isinstance(arg, fx.Node):
            return self.shapes.get(arg)
        if isinstance(arg, Tensor):
            return tuple(arg.shape)
        if isinstance(arg, int | float | bool):
            return ()
        return None

    def attr(self, node: Any) -> tuple[str, str] | None:
        """``("param", name)`` / ``("buffer", name)`` / ``("const", target)`` for a get_attr node."""
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        target = str(node.target)
        obj = _get_attr(self.gm, target)
        if isinstance(obj, nn.Parameter) and id(obj) in self.canonical:
            return ("param", self.canonical[id(obj)])
        try:
            self.model.get_buffer(target)
            return ("buffer", target)
        except (AttributeError, KeyError):
            return ("const", target)

    def param_view(self, node: Any) -> tuple[str, bool] | None:
        """``(name, transposed)`` if ``node`` is a 2-D parameter, possibly transposed once."""
        flips = False
        while isinstance(node, fx.Node) and op_name(node) in ("t", "transpose"):
            flips = not flips
            node = node.args[0]
        a = self.attr(node)
        if a is None or a[0] != "param":
            return None
        return a[1], flips


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_COMPOSITES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
               nn.TransformerDecoder, nn.Transformer)


def _unmasked(args: Any, kwargs: Any) -> bool:
    """A call ``encoder(src)`` with no mask, padding mask or causal flag set."""
    return len(args) == 1 and all(v is None or v is False for v in kwargs.values())


def _is_composite(m: nn.Module) -> bool:
    """torch's transformer layers: built of Linear, LayerNorm, MultiheadAttention and Dropout."""
    return isinstance(m, _COMPOSITES)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Sequence[type | str]) -> None:
        super().__init__()
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_names = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        if not super().is_leaf_module(m, qualname):
            return False
        # torch's transformer layers (nn.TransformerEncoderLayer, nn.Transformer, …) are built
        # of layers the search knows: traced through, not kept whole. One fx cannot trace
        # (control flow on its inputs) is then captured on its own, block by block.
        return not _is_composite(m)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(m, nn.TransformerEncoder) and not self.is_leaf_module(
                m, self.path_of_module(m)) and _unmasked(args, kwargs):
            # its forward asks ``src.is_nested`` (control flow fx cannot trace); without masks
            # and with the fast path off it is its layers in turn, then its norm
            out = args[0]
            for layer in m.layers:
                out = self.call_module(layer, layer.forward, (out,), {})
            if m.norm is not None:
                out = self.call_module(m.norm, m.norm.forward, (out,), {})
            return out
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            if not hasattr(err, "_nt_module"):
                err._nt_module = (self.path_of_module(m), type(m).__name__)  # type: ignore[attr-defined]
            raise


def _user_frame(err: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch and neurothermo.symmetry."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _HERE))]
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}: `{(f.line or '').strip()}`"


def _run_failure(model: nn.Module, err: BaseException, node: str) -> UntraceableModelError:
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    line = _user_frame(cause)
    return UntraceableModelError(
        f"find_symmetries traced {type(model).__name__} but running it on example_inputs failed "
        f"at node '{node}'{f' ({line})' if line else ''}: {type(cause).__name__}: {cause}. "
        "Check that example_inputs are valid inputs of model.forward."
    )


def _fail(model: nn.Module, err: BaseException) -> UntraceableModelError:
    where = getattr(err, "_nt_module", None)
    sub = f" in submodule '{where[0]}' ({where[1]})" if where and where[0] else ""
    line = _user_frame(err)
    at = f" at {line}" if line else ""
    out = UntraceableModelError(
        f"find_symmetries cannot trace {type(model).__name__}{sub}{at}: "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "torch.fx traces tensor operations only: Python control flow on tensor values "
        "(if/while on a tensor, .item(), len() of a traced value, numpy calls) cannot be traced. "
        "Wrap the data-dependent part in its own nn.Module and pass it (its class or qualified "
        "name) as leaf_modules=[...] (symmetries inside it are then not searched), or rewrite it "
        "with tensor operations (e.g. torch.where instead of if)."
    )
    out.module_path = where[0] if where else ""
    return out


def _defaults(model: nn.Module, given: int) -> dict[str, Any] | None:
    """Optional ``forward`` arguments not given in the example: traced at their default value."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None  # fx cannot bind concrete arguments next to *args / **kwargs
    out = {p.name: p.default for p in params[given:]
           if p.default is not inspect.Parameter.empty
           and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return out or None


def trace_model(
    model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...],
    leaf_modules: Sequence[type | str] = (),
) -> Traced:
    """Trace ``model`` and propagate ``example_inputs`` to get every node's output shape."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else example_inputs
    if not isinstance(inputs, tuple | list) or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError(
            "example_inputs must be a tensor or a tuple of tensors (the positional arguments of "
            f"model.forward), got {type(example_inputs).__name__}"
        )
    tracer = _Tracer(leaf_modules)
    try:
        # torch's transformer layers test for their fused path with Python control flow fx
        # cannot trace; with the flag off that test is decided before any input is looked at,
        # and the traced graph is the ordinary path, the same function
        with mha_fastpath_off():
            graph = tracer.trace(model, concrete_args=_defaults(model, len(inputs)))
    except Exception as err:
        raise _fail(model, err) from err
    gm = fx.GraphModule(tracer.root, graph)
    n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if n_in < len(inputs):
        raise TypeError(f"model.forward takes {n_in} inputs, example_inputs has {len(inputs)}")
    prop = ShapeProp(gm)
    try:
        with preserved_state(model), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*inputs)
    except Exception as err:
        current = [n.name for n in gm.graph.nodes if n not in prop.env]
        raise _run_failure(model, err, current[0] if current else "?") from err
    return annotate(model, gm)


def annotate(model: nn.Module, gm: fx.GraphModule) -> Traced:
    """The :class:`Traced` of a shape-propagated graph (fx or dynamo): every node's shape (``()``
    for Python or symbolic scalars, None when unknown), parameter names and use counts."""
    shapes: dict[fx.Node, tuple[int, ...] | None] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        scalar = node.meta.get("type") in (int, float, bool) or isinstance(
            node.meta.get("val"), int | float | bool | torch.SymInt)
        shapes[node] = tuple(meta.shape) if hasattr(meta, "shape") else () if scalar else None
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    traced = Traced(model, gm, shapes, canonical)
    traced.uses = count_uses(traced)
    return traced


def _sites(node: fx.Node) -> int:
    total = 0
    for user in node.users:
        op = op_name(user)
        if op == "meta":
            continue
        total += _sites(user) if op in VIEW_OPS else 1
    return total


def count_uses(tr: Traced) -> dict[str, int]:
    """How many operations use each parameter (a tied weight is used more than once)."""
    uses: dict[str, int] = {}
    for node in tr.gm.graph.nodes:
        if node.op == "call_module":
            mod = tr.gm.get_submodule(str(node.target))
            ids = {id(p) for _, p in mod.named_parameters(remove_duplicate=False)}
            for i in ids:
                if i in tr.canonical:
                    uses[tr.canonical[i]] = uses.get(tr.canonical[i], 0) + 1
        elif node.op == "get_attr":
            a = tr.attr(node)
            if a is not None and a[0] == "param":
                uses[a[1]] = uses.get(a[1], 0) + _sites(node)
    return uses


def example_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()

