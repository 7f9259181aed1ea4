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

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from neurothermo.gradstats._pieces import Piece


class PerSampleUnsupportedError(ValueError):
    """The model has a part whose per-sample gradients cannot be measured (the message names it
    and the way out): batch statistics, a layer input without a batch axis, a parameter used
    outside its module, a module ``torch.func`` cannot evaluate one sample at a time. A
    ``ValueError``, so ``except ValueError`` still catches it; the monitor catches this one to go
    on without its noise columns.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> try:
        ...     nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
        ... except nt.PerSampleUnsupportedError as e:  # batch statistics couple the samples
        ...     print(str(e)[:39])
        BatchNorm module '1' is in train mode:
    """


# the layout of the pass being evaluated (``_layout.py``): its batch-less inputs by id,
# (tensor, b', probe size), and its folded ones, (tensor, m)
_Layout = tuple[Mapping[int, tuple[Tensor, int, int]], Mapping[int, tuple[Tensor, int]],
                Mapping[int, int]]
_JUDGED: ContextVar[_Layout | None] = ContextVar("_JUDGED", default=None)


@dataclass(frozen=True)
class Call:
    """One recorded forward call of ``module`` (qualified name ``name``) on a batch of ``b``.

    ``output`` is kept only for the fallback (None for modules with a rule: rules get the output
    gradients, and holding every output would raise the peak memory of the backward). A rule's
    ``pieces(call, deltas)`` receives it; :meth:`param` and :meth:`input` read it.

    Attributes:
        module: the module instance that was called.
        name: its qualified name in the model.
        args, kwargs: the call's positional and keyword arguments.
        output: the call's output (fallback only), else None.
        batch_size: b, the number of samples of the batch.
        wanted: ids of the parameters whose per-sample gradients are wanted.
        adopted: ``(name in module, parameter)`` of descendants' parameters the module's own
            forward uses directly (fallback only: measured with the module's own).
    """

    module: nn.Module
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    batch_size: int
    wanted: frozenset[int]
    adopted: tuple[tuple[str, Tensor], ...] = ()

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
    is reduced to its norm, and its inputs freed, as soon as that use is evaluated). A rule's
    ``forward`` override creates them and hands them to :meth:`Sink.add`.

    Attributes:
        name: the qualified name of the module (for messages).
        targets: autograd edges of the outputs whose gradients ``compute`` needs.
        compute: ``compute(deltas) -> list[Piece]``.
        watched: the tensors ``compute`` reads.
        params: ids of the parameters its pieces may be for.
        versions: the ``watched`` tensors' version counters when recorded (set on creation).
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
    """What a ``forward`` override (a :class:`Rule`'s ``forward``) sees of the recorder.

    Attributes:
        active: whether recording is on (False: run the plain forward).
        clone: whether recorded inputs must be cloned (they may be modified in place later).
        create_graph: whether the pieces must stay differentiable.
        batch_size: b.
        wanted: ids of the parameters whose per-sample gradients are wanted.
        adopted: ``(name in module, parameter)`` of descendants' parameters the module's own
            forward uses directly (fallback only: measured with the module's own).
    """

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
    """A per-sample gradient rule for one module type; register it with :func:`register_rule`.

    ``deltas[j] = ∂l_B/∂(output leaf j)`` is the gradient of the *mean* batch loss ``l_B = (1/b)
    Σ_i l_i``, so the pieces a rule returns carry the factor ``1/b`` of sample i's share of
    ``∇l_B``; the norms are rescaled to ``‖∇l_i‖²`` afterwards. The instance is a frozen record.

    Args:
        pieces: ``pieces(call, deltas) -> list[Piece]``: exact pieces of the per-sample gradients
            of the module's own parameters from a :class:`Call` (``deltas`` follow the output's
            tensor leaves, ``None`` where a leaf does not reach the loss or needs no gradient).
        forward: optional ``forward(module, name, sink, args, kwargs)`` that replaces the
            module's forward while recording, for rules that need its intermediates (it adds
            :class:`Use` records to the :class:`Sink`).
        applies: optional test of a module instance; configurations it rejects use the exact
            fallback.

    Raises:
        Nothing: at construction (a frozen record). A ``pieces`` that cannot handle a call
            should raise ``ValueError`` naming the module, which the caller reports.

    Example:
        >>> from torch import nn
        >>> from neurothermo.gradstats import Rule
        >>> from neurothermo.gradstats.rules import rule_for
        >>> isinstance(rule_for(nn.Linear(4, 3)), Rule)
        True
    """

    pieces: PiecesFn
    forward: ForwardFn | None = None
    applies: Callable[[nn.Module], bool] | None = None


_RULES: dict[type[nn.Module], Rule] = {}
# Rules for classes of optional packages, by "module.QualName": registering them must not import
# the package (transformers takes seconds to import); they apply once the class exists.
_NAMED_RULES: dict[str, Rule] = {}
# Rules found by looking at a class (``hf_rms_norm.py``: the source of its forward), asked only
# for classes no registered rule covers; their answers are cached per class.
_MATCHERS: list[Callable[[type[nn.Module]], Rule | None]] = []
_MATCHED: dict[type[nn.Module], Rule | None] = {}


def register_matcher(match: Callable[[type[nn.Module]], Rule | None]) -> None:
    """Ask ``match(cls)`` for the rule of module classes no registered rule covers (internal:
    for families of classes that share one forward under many names, as Hugging Face's
    RMSNorm copies do)."""
    _MATCHERS.append(match)
    _MATCHED.clear()


def register_named_rule(qualified_name: str, rule: Rule) -> None:
    """Use ``rule`` for the class ``qualified_name`` (``"package.module.Class"``) and for its
    subclasses that keep its ``forward``, without importing the package that defines it.

    Args:
        qualified_name: ``f"{cls.__module__}.{cls.__qualname__}"`` of the class.
        rule: the :class:`Rule`.

    Raises:
        Nothing: the name is not checked (a class that never appears never matches).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from neurothermo.gradstats import Rule
        >>> from neurothermo.gradstats.rules import fallback_pieces, register_named_rule, rule_for
        >>> class Gain(nn.Module):  # y = g ⊙ x
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.g = nn.Parameter(torch.ones(3))
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return self.g * x
        >>> rule = Rule(fallback_pieces)  # the exact generic path, standing in for a closed form
        >>> register_named_rule(f"{Gain.__module__}.{Gain.__qualname__}", rule)
        >>> rule_for(Gain()) is rule
        True
    """
    _NAMED_RULES[qualified_name] = rule


def register_rule(module_type: type[nn.Module], rule: Rule) -> None:
    """Use ``rule`` for ``module_type`` and for subclasses that do not override ``forward``.

    Registering a type again replaces its rule. Test a new rule against the per-sample loop in
    float64 (``tests/_helpers.assert_matches_naive``).

    Args:
        module_type: the ``nn.Module`` subclass.
        rule: its :class:`Rule`.

    Raises:
        TypeError: ``module_type`` not an ``nn.Module`` subclass, or ``rule`` not a :class:`Rule`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> from neurothermo.gradstats import Rule, register_rule
        >>> from neurothermo.gradstats._pieces import Dense, Piece
        >>> class Gain(nn.Module):  # y = g ⊙ x: no built-in rule
        ...     def __init__(self, d: int) -> None:
        ...         super().__init__()
        ...         self.g = nn.Parameter(torch.ones(d))
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return self.g * x
        >>> def gain_pieces(call, deltas):  # sample i's share of ∂l_B/∂g: δ_i ⊙ x_i
        ...     g, (delta,) = call.param("g"), deltas
        ...     return [] if g is None or delta is None else [Piece(g, Dense(delta * call.input()))]
        >>> register_rule(Gain, Rule(gain_pieces))
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), Gain(3))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> norms = nt.per_sample_grad_norms(model, nn.CrossEntropyLoss(), (x, y))
        >>> naive = torch.stack([sum((t ** 2).sum() for t in torch.autograd.grad(  # one sample at a time
        ...     nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters())))
        ...     for i in range(8)])
        >>> torch.allclose(norms, naive)
        True
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a Rule, got {type(rule).__name__}")
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule for ``module``, or None (use the fallback).

    A subclass of a registered type gets its rule only if it keeps the registered ``forward``: a
    subclass that computes something else must never be given a closed form that no longer holds.

    Args:
        module: the module instance.

    Returns:
        Its :class:`Rule`, or None when none is registered for its type (or ``applies`` rejects
        it): the exact fallback is used.

    Raises:
        Nothing: of its own; it propagates what a rule's ``applies`` raises.

    Example:
        >>> from torch import nn
        >>> from neurothermo.gradstats.rules import rule_for
        >>> rule_for(nn.Linear(2, 2)) is not None, rule_for(nn.PReLU())
        (True, None)
    """
    cls = type(module)
    for base in cls.__mro__:
        rule = _RULES.get(base) or _NAMED_RULES.get(f"{base.__module__}.{base.__qualname__}")
        if rule is not None:
            if cls.forward is not getattr(base, "forward", None):
                return None
            return rule if rule.applies is None or rule.applies(module) else None
    if cls not in _MATCHED:
        _MATCHED[cls] = next((r for f in _MATCHERS if (r := f(cls)) is not None), None)
    rule = _MATCHED[cls]
    return rule if rule is None or rule.applies is None or rule.applies(module) else None


_NO_BATCH_AXIS = (
    "A module called on an input with no batch axis at all, whose output every sample shares "
    "(T5's relative_attention_bias on [q_len, k_len] position buckets), has no per-sample "
    "gradient its own hooks can read: leave its parameters out of θ (module.requires_grad_(False); "
    "the per-sample norms are then exact for the rest)."
)


_FOLDED = (
    " This input's leading size is a multiple of the batch size (the batch folded with another "
    "axis, as window attention does): that is measured when the fold is sample-major (sample "
    "i's rows together, checked against the layout probe) and the layer is a Linear, Conv1D, "
    "Embedding or LayerNorm/RMSNorm; not for this layer or this order."
)


def batch_first(call_name: str, x: Tensor, b: int, what: str = "input") -> Tensor:
    """Return ``x`` if its leading axis is the batch axis, else raise naming the module.

    Besides the leading size, an input the layout probe found batch-less (``_layout.py``: its
    leading size is ``b`` here only by coincidence) is refused.
    """
    if x.dim() == 0 or x.shape[0] != b:
        lead = "a scalar" if x.dim() == 0 else f"leading dimension {x.shape[0]}"
        raise PerSampleUnsupportedError(
            f"module {call_name!r} got an {what} with {lead}, but the batch has {b} samples: "
            "per-sample gradients need batch-first activations (dim 0 = sample). Use "
            "batch_first=True layouts, or call the module on batched input (an input broadcast "
            "over the batch, leading dimension 1, is handled when the module's output keeps "
            "that leading 1 and the model accepts it expanded to the batch). " + _NO_BATCH_AXIS
            + (_FOLDED if x.dim() and x.shape[0] > b and x.shape[0] % b == 0 else "")
        )
    probe = batchless_size(x)
    layout = _JUDGED.get()
    axis = None if layout is None else layout[2].get(id(x))
    if probe is not None and axis is not None:
        raise PerSampleUnsupportedError(
            f"module {call_name!r} got an {what} of shape {tuple(x.shape)} whose samples are on "
            f"axis {axis}, not 0 (a time-major layout such as XLNet's [T, b, …]; its leading "
            f"size equals the batch size {b} only by coincidence): per-sample gradients need "
            "batch-first activations (dim 0 = sample). Use batch_first=True layouts or move the "
            "batch axis first before this module.")
    if probe is not None:
        size, kept = probe
        raise PerSampleUnsupportedError(
            f"module {call_name!r} got an {what} of shape {tuple(x.shape)} whose leading "
            f"dimension equals the batch size {b} only by coincidence: on a sub-batch of {size} "
            f"sample{'s' * (size > 1)} it is still {kept}, so it has no batch axis and its rows "
            "are not samples. " + _NO_BATCH_AXIS
        )
    return x


@contextmanager
def judged(batchless: Mapping[int, tuple[Tensor, int, int]],
           folded: Mapping[int, tuple[Tensor, int]] | None = None,
           axes: Mapping[int, int] | None = None) -> Iterator[None]:
    """Within the block, rules see ``batchless`` inputs as such (:func:`batchless_size`; with
    ``axes[id]`` the axis that does carry the samples, when one does) and ``folded`` ones as
    ``m`` rows per sample (:func:`batch_rows`)."""
    token = _JUDGED.set((batchless, folded or {}, axes or {}))
    try:
        yield
    finally:
        _JUDGED.reset(token)


def batchless_size(x: Tensor) -> tuple[int, int] | None:
    """``(b', size)`` if ``x`` was found batch-less in the pass being evaluated, else None."""
    layout = _JUDGED.get()
    hit = None if layout is None else layout[0].get(id(x))
    return None if hit is None or hit[0] is not x else (hit[1], hit[2])


def fold_of(x: Tensor) -> int:
    """``m`` if ``x`` folds the batch sample-major with ``m`` rows per sample, else 1."""
    layout = _JUDGED.get()
    hit = None if layout is None else layout[1].get(id(x))
    return 1 if hit is None or hit[0] is not x else hit[1]


def batch_rows(call_name: str, x: Tensor, b: int, what: str = "input") -> int:
    """Rows per sample of ``x``: 1 for a batch-first input, ``m`` for one the layout probe found
    folded sample-major (``[b·m, …]``, sample ``i`` owning rows ``[i·m, (i+1)·m)``, e.g. Swin's
    windows); else raise as :func:`batch_first`. For rules whose pieces only reshape the input to
    ``(b, -1, …)`` (Linear, Conv1D, Embedding, trailing-dim norms): that reshape is then exact."""
    m = fold_of(x)
    if m > 1 and x.dim() and x.shape[0] == m * b:
        return m
    batch_first(call_name, x, b, what)
    return 1
