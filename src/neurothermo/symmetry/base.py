"""The :class:`Symmetry` record and its Noether charge (docs/theory.md §2).

A symmetry acts on slices of parameters. Every slice is read as a matrix ``M`` of shape
``(n_units, m)``: the unit axis ``dim`` of the (optionally reshaped) tensor moved to the front and
narrowed to ``start:stop``; row ``i`` holds everything the group element of unit ``i`` touches.
Slices have a role:

* ``"in"``  (covariant): ``M → G·M`` (the producer's weight rows and bias of a hidden unit),
* ``"out"`` (contravariant): ``M → G⁻ᵀ·M`` (the consumer's weight columns),
* ``"passive"``: only permuted (PReLU slopes, normalisation parameters and running statistics).

``G`` is ``diag(s)`` for ``rescale``/``scale`` (``s > 0``), ``diag(±1)`` for ``sign_flip``, a
permutation matrix for ``permutation`` and an invertible ``block × block`` matrix per block for
``double_rotation``. The generator ``A`` of the one-parameter subgroups with symmetric generators
gives the charge ``J = θᵀAθ``::

    J = Σ_in M Mᵀ − Σ_out M Mᵀ        (per block: a matrix; diagonal groups: per unit ‖·‖² sums)

It is conserved by gradient flow, and one SGD step with torch's weight decay ``wd`` (penalty
``(wd/2)‖θ‖²``, applied to *every* parameter of the orbit) changes it exactly to::

    J' = (1 − lr·wd)²·J + lr²·(Σ_in g gᵀ − Σ_out g gᵀ)          (g = ∇l_B, without the wd term)

If the optimizer decays only some parameters of the orbit (e.g. no decay on biases) the identity
does not hold. Isometries (permutation, sign flip) have no charge.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from neurothermo._validate import check_positive

ROLES = ("in", "out", "passive")
_SIGN = {"in": 1.0, "out": -1.0}


@dataclass(frozen=True)
class ParamSlice:
    """One tensor's share of a symmetry's orbit (see the module docstring for ``M``).

    Attributes:
        name: the parameter's (or buffer's) qualified name in the model.
        role: ``"in"`` (``M → G·M``), ``"out"`` (``M → G⁻ᵀ·M``) or ``"passive"`` (only permuted).
        dim: the unit axis of the (viewed) tensor; None: the whole tensor is one unit's share.
        start, stop: the range of units along ``dim`` (``stop`` None: to the end).
        view: a shape the tensor is viewed as first (fused projections, heads); None: as it is.
        buffer: True for a buffer (running statistics), which has no gradient.
    """

    name: str
    role: str
    dim: int | None
    start: int = 0
    stop: int | None = None
    view: tuple[int, ...] | None = None
    buffer: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def describe(self) -> str:
        axis = "all" if self.dim is None else f"dim {self.dim}"
        rng = "" if self.start == 0 and self.stop is None else f" [{self.start}:{self.stop}]"
        shape = "" if self.view is None else f" viewed as {self.view}"
        return f"{self.name} ({self.role}, {axis}{rng}{shape})"

    def unit_view(self, t: Tensor) -> Tensor:
        """A view of ``t`` with the units first (no copy): shape ``(n_units, ...)``."""
        v = t.view(self.view) if self.view is not None else t
        if self.dim is None:
            return v.unsqueeze(0)
        v = v.movedim(self.dim, 0)
        stop = v.shape[0] if self.stop is None else self.stop
        return v.narrow(0, self.start, stop - self.start)

    def matrix(self, t: Tensor, n_units: int) -> Tensor:
        """``M``: the slice of ``t`` as an ``(n_units, m)`` matrix."""
        u = self.unit_view(t)
        if u.shape[0] != n_units:
            raise ValueError(
                f"{self.describe()}: expected {n_units} units along the unit axis, found "
                f"{u.shape[0]} (tensor shape {tuple(t.shape)}); the model changed since detection"
            )
        return u.reshape(n_units, -1)


class GroupKind(Protocol):
    """How one kind of symmetry acts: registered by the kind modules (rescale.py, …)."""

    @property
    def name(self) -> str: ...

    @property
    def isometry(self) -> bool: ...

    @property
    def element_help(self) -> str: ...

    def check_element(self, sym: Symmetry, element: Tensor) -> Tensor: ...

    def random_element(
        self, sym: Symmetry, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> Tensor: ...

    def act(self, sym: Symmetry, element: Tensor, role: str, m: Tensor) -> Tensor: ...


_KINDS: dict[str, GroupKind] = {}


def register_kind(kind: GroupKind) -> GroupKind:
    _KINDS[kind.name] = kind
    return kind


def group_kind(name: str) -> GroupKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown symmetry kind {name!r}; known: {sorted(_KINDS)}") from None


def quadratic_charge(
    views: list[tuple[str, Tensor]], n_units: int, block: int, whole: bool
) -> Tensor:
    """``Σ_in M Mᵀ − Σ_out M Mᵀ`` restricted to the group's structure (pure function).

    ``views``: ``(role, u)`` with ``u`` a units-first view of a slice (``ParamSlice.unit_view``).
    ``block == 1``: the diagonal, shape ``(n_units,)``; ``block > 1``: one ``block × block`` matrix
    per block, shape ``(n_units/block, block, block)``, or ``(block, block)`` for a single block;
    ``whole``: the scalar ``Σ_in ‖M‖² − Σ_out ‖M‖²``. Diagonal and whole forms are fused norm
    reductions over the views (no copy of transposed or sliced weights).
    """
    total: Tensor | None = None
    for role, u in views:
        if role == "passive":
            continue
        if whole:
            q = torch.linalg.vector_norm(u).square()
        elif block == 1:
            dims = tuple(range(1, u.ndim))
            if not dims:
                q = u.square()
            elif u.is_contiguous():  # rows: a fused norm reduction
                q = torch.linalg.vector_norm(u, dim=dims).square()
            else:  # columns: a strided norm reduction is slow; square then sum is not
                q = u.square().sum(dims)
        else:
            b = u.reshape(n_units // block, block, -1)
            q = b @ b.transpose(1, 2)
        q = q if role == "in" else -q
        total = q if total is None else total + q
    if total is None:
        raise ValueError("symmetry has no 'in' or 'out' slices: it carries no charge")
    if block > 1 and n_units == block:
        total = total[0]
    return total


Params = nn.Module | Mapping[str, Tensor]


def _lookup(source: Params, s: ParamSlice) -> Tensor:
    if isinstance(source, nn.Module):
        return source.get_buffer(s.name) if s.buffer else source.get_parameter(s.name)
    if s.name not in source:
        raise KeyError(
            f"{s.name!r} is missing from the mapping; pass every parameter of the symmetry "
            "(e.g. {n: p.grad for n, p in model.named_parameters()})"
        )
    return source[s.name]


@dataclass(frozen=True)
class Symmetry:
    """One symmetry of a model's loss, found by :func:`find_symmetries` and verified numerically.

    ``kind``: ``"rescale"``, ``"scale"``, ``"double_rotation"``, ``"permutation"``, ``"sign_flip"``;
    ``location``: readable path (``"fc1 → relu → fc2 (512 units)"``); ``slices``: the parameter
    slices it acts on; ``n_units``: size of the unit axis; ``block``: size of the blocks a
    double rotation acts on (per attention head: the head dimension); ``whole``: a single scale
    for all slices (LayerNorm after a linear map). ``exact`` is False for an *approximate*
    symmetry: one that holds exactly only in a limit the model does not reach (a normalisation's
    ``eps → 0``); ``breaking`` is then the relative output change measured at detection under
    random group elements and ``broken_by`` names the cause. ``isometry`` is True for permutation
    and sign flips. A double rotation's group is GL(block) (not isometric; its charge is the symmetric part);
    its orthogonal subgroup O(block) acts isometrically and :meth:`transform` accepts it too.
    The diagonal of a double rotation's charge is the per-unit rescale charge.

    Attributes:
        kind: ``"rescale"``, ``"scale"``, ``"double_rotation"``, ``"permutation"`` or
            ``"sign_flip"``.
        location: readable path (``"fc1 → relu → fc2 (512 units)"``).
        slices: the parameter slices it acts on (:class:`ParamSlice`).
        n_units: size of the unit axis.
        block: size of the blocks a double rotation acts on (per attention head: the head
            dimension); 1 otherwise.
        whole: a single scale for all slices (LayerNorm after a linear map).
        exact: False for an approximate symmetry (exact only as a normalisation's ``eps → 0``).
        breaking: the relative output change measured at detection (approximate symmetries).
        broken_by: the cause of the breaking, in words.
    """

    kind: str
    location: str
    slices: tuple[ParamSlice, ...]
    n_units: int
    block: int = 1
    whole: bool = False
    exact: bool = True
    breaking: float = 0.0
    broken_by: str = ""

    @property
    def isometry(self) -> bool:
        return group_kind(self.kind).isometry

    @property
    def has_charge(self) -> bool:
        return not self.isometry

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the trainable parameters the symmetry acts on (buffers excluded)."""
        return tuple(dict.fromkeys(s.name for s in self.slices if not s.buffer))

    @property
    def charge_shape(self) -> tuple[int, ...]:
        if self.whole:
            return ()
        if self.block == 1:
            return (self.n_units,)
        if self.block == self.n_units:
            return (self.block, self.block)
        return (self.n_units // self.block, self.block, self.block)

    def __str__(self) -> str:
        if self.exact:
            return f"{self.kind}: {self.location}"
        return (f"{self.kind} (approximate, broken by {self.broken_by}: breaking "
                f"{self.breaking:.1e} at the model's eps): {self.location}")

    def _no_charge(self) -> None:
        if self.isometry:
            raise ValueError(
                f"{self.kind} symmetries are isometries of parameter space: they have no Noether "
                "charge and SGD never breaks them (docs/theory.md §2). Use transform/verify instead."
            )

    def _form(self, source: Params, what: str) -> Tensor:
        mats = []
        for s in self.slices:
            if s.role == "passive":
                continue
            t = _lookup(source, s)
            if t is None:
                raise ValueError(
                    f"no {what} for {s.name!r}: call loss.backward() first (and keep "
                    "requires_grad=True on every parameter of the symmetry)"
                )
            u = s.unit_view(t.detach())
            if u.shape[0] != self.n_units:
                s.matrix(t, self.n_units)  # raises with a message naming the slice
            mats.append((s.role, u))
        return quadratic_charge(mats, self.n_units, self.block, self.whole)

    def charge(self, model: Params) -> Tensor:
        """``J = Σ_in M Mᵀ − Σ_out M Mᵀ`` of the current parameters (shape :attr:`charge_shape`).

        ``model`` is the module or a mapping name → tensor (e.g. ``dict(model.named_parameters())``).
        """
        self._no_charge()
        return self._form(model, "parameter")

    def imbalance(self, grads: Mapping[str, Tensor | None]) -> Tensor:
        """``gᵀAg = Σ_in g gᵀ − Σ_out g gᵀ`` for a mapping name → gradient (e.g. ``{n: p.grad}``).

        Zero in expectation at gradient balance (docs/theory.md §2); same shape as the charge.
        """
        self._no_charge()
        if not isinstance(grads, Mapping):
            raise TypeError(
                f"grads must be a mapping parameter name → gradient, e.g. "
                f"{{n: p.grad for n, p in model.named_parameters()}}; got {type(grads).__name__}"
            )
        return self._form(grads, "gradient")  # type: ignore[arg-type]

    def predict_charge(
        self, charge: Tensor, grads: Mapping[str, Tensor | None], lr: float,
        weight_decay: float = 0.0,
    ) -> Tensor:
        """The charge after one SGD step: ``(1 − lr·wd)²·J + lr²·gᵀAg`` (exact for plain SGD).

        ``grads`` are the minibatch gradients ``g_B`` *without* the weight-decay term; ``lr`` and
        ``weight_decay`` as in ``torch.optim.SGD`` (decay on every parameter of the orbit).
        """
        lr = check_positive("lr", lr)
        wd = check_positive("weight_decay", weight_decay, allow_zero=True)
        if not isinstance(charge, Tensor) or tuple(charge.shape) != self.charge_shape:
            got = tuple(charge.shape) if isinstance(charge, Tensor) else type(charge).__name__
            raise ValueError(f"charge must be a tensor of shape {self.charge_shape}, got {got}")
        return (1.0 - lr * wd) ** 2 * charge + lr**2 * self.imbalance(grads)

    def random_element(
        self, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """A random group element (well conditioned), for :func:`verify_symmetry` and tests."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return group_kind(self.kind).random_element(self, gen, dtype, torch.device(device))

    def transform(self, model: nn.Module, element: Tensor) -> nn.Module:
        """Apply a group element to ``model``'s parameters in place; returns ``model``.

        ``element``: ``rescale``/``scale``: positive scales per unit (a positive scalar for a whole
        scale); ``double_rotation``: an invertible matrix per block; ``permutation``: a permutation
        of ``range(n_units)`` (new unit ``i`` is old unit ``perm[i]``); ``sign_flip``: ±1 per unit.
        """
        kind = group_kind(self.kind)
        if not isinstance(element, Tensor):
            element = torch.as_tensor(element)
        element = kind.check_element(self, element)
        with torch.no_grad():
            for s in self.slices:
                t = _lookup(model, s)
                u = s.unit_view(t)
                m = u.reshape(self.n_units, -1)
                new = kind.act(self, element.to(device=t.device), s.role, m)
                u.copy_(new.reshape(u.shape))
        return model


def check_units_vector(
    sym: Symmetry, element: Tensor, what: str, ok: Callable[[Tensor], Tensor]
) -> Tensor:
    """Validate a per-unit element vector of shape ``(n_units,)``."""
    if element.shape != (sym.n_units,):
        raise ValueError(
            f"{sym.kind} element must have shape ({sym.n_units},) (one per unit), got "
            f"{tuple(element.shape)}"
        )
    if not bool(ok(element).all()):
        raise ValueError(f"{sym.kind} element must be {what}")
    return element
