"""The extension point: a registry mapping a module type to its per-sample gradient rule.

A rule turns one recorded call of a module (its inputs, its output and ``δ``, the gradient of the
mean batch loss with respect to that output) into exact :class:`~neurothermo.gradstats._pieces.Piece`
objects for the module's *own* parameters. Rules that need intermediate tensors of the module's
forward (attention: the q/k/v projections) also supply ``forward``, which replaces the module's
forward while recording and adds :class:`Use` records itself.

Adding a layer is one small file: write ``pieces(call, deltas)`` and call
``register_rule(MyModule, Rule(pieces))``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from neurothermo.gradstats._pieces import Piece


@dataclass(frozen=True)
class Call:
    """One recorded forward call of ``module`` (qualified name ``name``) on a batch of ``b``.

    ``output`` is kept only for the fallback (None for modules with a rule: rules get the output
    gradients, and holding every output would raise the peak memory of the backward).
    """

    module: nn.Module
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    batch_size: int
    wanted: frozenset[int]

    def param(self, local_name: str) -> Tensor | None:
        """The module's parameter ``local_name`` if its per-sample gradients are wanted."""
        p = getattr(self.module, local_name, None)
        return p if isinstance(p, Tensor) and id(p) in self.wanted else None

    def input(self, i: int = 0) -> Tensor:
        x = self.args[i] if i < len(self.args) else None
        if not isinstance(x, Tensor):
            raise ValueError(f"module {self.name!r}: positional argument {i} is not a tensor")
        return x


@dataclass
class Use:
    """A pending rule evaluation: ``compute(deltas)`` with ``deltas[j] = ∂l_B/∂targets[j]``, the
    targets being autograd edges of the outputs the rule needs gradients for.

    ``watched`` are the tensors ``compute`` reads; they must not be modified in place later.
    ``params`` are the ids of the parameters its pieces may be for (a parameter with a single use
    is reduced to its norm, and its inputs freed, as soon as that use is evaluated).
    """

    name: str
    targets: list[GradientEdge]
    compute: Callable[[list[Tensor | None]], list[Piece]]
    watched: list[Tensor]
    params: frozenset[int]
    versions: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.versions = [t._version for t in self.watched]

    def modified_in_place(self) -> bool:
        return any(t._version != v for t, v in zip(self.watched, self.versions))


class Sink(Protocol):
    """What a ``forward`` override sees of the recorder."""

    active: bool
    clone: bool
    create_graph: bool
    batch_size: int
    wanted: frozenset[int]

    def add(self, use: Use) -> None: ...


PiecesFn = Callable[[Call, list[Tensor | None]], list[Piece]]
ForwardFn = Callable[[nn.Module, str, Sink, tuple[Any, ...], dict[str, Any]], Any]


@dataclass(frozen=True)
class Rule:
    """``pieces(call, deltas)``: exact pieces from a call (``deltas`` follow the output's tensor
    leaves, ``None`` where a leaf does not reach the loss or needs no gradient). ``forward``: optional override of the
    module's forward while recording, for rules that need its intermediates. ``applies``:
    optional test of a module instance (configurations the rule does not cover use the
    fallback)."""

    pieces: PiecesFn
    forward: ForwardFn | None = None
    applies: Callable[[nn.Module], bool] | None = None


_RULES: dict[type[nn.Module], Rule] = {}
# Rules for classes of optional packages, by "module.QualName": registering them must not import
# the package (transformers takes seconds to import); they apply once the class exists.
_NAMED_RULES: dict[str, Rule] = {}


def register_named_rule(qualified_name: str, rule: Rule) -> None:
    """Use ``rule`` for the class ``qualified_name`` (``"package.module.Class"``) and for its
    subclasses that keep its ``forward``, without importing the package that defines it."""
    _NAMED_RULES[qualified_name] = rule


def register_rule(module_type: type[nn.Module], rule: Rule) -> None:
    """Use ``rule`` for ``module_type`` and for subclasses that do not override ``forward``."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a Rule, got {type(rule).__name__}")
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule for ``module``, or None (use the fallback).

    A subclass of a registered type gets its rule only if it keeps the registered ``forward``: a
    subclass that computes something else must never be given a closed form that no longer holds.
    """
    cls = type(module)
    for base in cls.__mro__:
        rule = _RULES.get(base) or _NAMED_RULES.get(f"{base.__module__}.{base.__qualname__}")
        if rule is not None:
            if cls.forward is not getattr(base, "forward", None):
                return None
            return rule if rule.applies is None or rule.applies(module) else None
    return None


def batch_first(call_name: str, x: Tensor, b: int, what: str = "input") -> Tensor:
    """Return ``x`` if its leading axis is the batch axis, else raise naming the module."""
    if x.dim() == 0 or x.shape[0] != b:
        lead = "a scalar" if x.dim() == 0 else f"leading dimension {x.shape[0]}"
        raise ValueError(
            f"module {call_name!r} got an {what} with {lead}, but the batch has {b} samples: "
            "per-sample gradients need batch-first activations (dim 0 = sample). Use "
            "batch_first=True layouts, or call the module on batched input (an input broadcast "
            "over the batch, leading dimension 1, is handled when the module's output keeps "
            "that leading 1 and the model accepts it expanded to the batch)."
        )
    return x
