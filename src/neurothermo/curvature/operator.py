"""Symmetric linear operators on flat vectors, and the map between flat vectors and parameter dicts.

Every curvature algorithm in neurothermo (Lanczos, power iteration, Hutchinson, Hutch++) sees the
Hessian only through ``op.matmat(V)``: ``V`` is ``(n, p)`` (``p`` vectors as columns), the result is
``H @ V``. ``op.n_matvec`` counts matrix-vector products (one column of one ``matmat`` = one
Hessian-vector product), which is the cost measure the benchmarks report.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from neurothermo.curvature.huge_pages import empty_large

# narrow + view of every piece in one C++ call (what DDP uses to unpack its flat buckets)
_unflatten_dense: Callable[[Tensor, list[Tensor]], list[Tensor]] | None = getattr(
    torch._C._nn, "unflatten_dense_tensors", None)


def column_block(n: int, m: int, dtype: torch.dtype, device: torch.device | str, *,
                 zero: bool = True) -> Tensor:
    """``(n, m)`` zeros stored column by column (the transpose of a row-major ``(m, n)`` buffer).

    Krylov bases are read and written one column at a time; in row-major ``(n, m)`` storage a column
    is strided, so touching one costs as much memory traffic as the whole block (on an
    11-million-parameter model that made the eigensolver's bookkeeping cost 3× the products).
    A large CPU block is backed by 2 MiB pages where ``huge_pages.use_huge_pages()`` says so (opt-in)
    (``huge_pages.empty_large``): the first write of each new column, one per product, is then a
    few page faults instead of thousands.
    ``zero=False``: uninitialised (only written columns may be read).
    """
    return empty_large((m, n), dtype, device, zero=zero).T


class LinearOperator:
    """A symmetric ``n × n`` operator given by its action on blocks of vectors.

    Subclasses implement ``_matmat(V) -> H @ V``; this class counts the products
    (``n_matvec``) and checks the shapes. :func:`lanczos`, :func:`power_iteration`,
    :func:`hutchinson` and :func:`hutchpp` take any instance.

    Args:
        size: ``n``.
        dtype: the dtype of the vectors it acts on.
        device: their device.

    Raises:
        ValueError: from :meth:`matmat` / :meth:`matvec`: a block or vector of the wrong shape
            (nothing at construction).
        NotImplementedError: the base class's ``_matmat`` (a subclass implements it).

    Example:
        >>> import torch
        >>> from neurothermo.curvature import LinearOperator
        >>> class Twice(LinearOperator):  # H = 2·I
        ...     def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        ...         return 2 * V
        >>> op = Twice(3, torch.float64, "cpu")
        >>> op.matvec(torch.ones(3, dtype=torch.float64)).tolist(), op.n_matvec
        ([2.0, 2.0, 2.0], 1)
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_matvec = 0

    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        """``H @ V`` for ``V`` of shape ``(n, p)``; costs ``p`` matrix-vector products.

        ``out``: an ``(n, p)`` tensor (not overlapping ``V``) to write the result into and return;
        operators that can write there directly (``HessianOperator``) save an allocation of ``n·p``
        numbers, the others copy.
        """
        if V.ndim != 2 or V.shape[0] != self.size:
            raise ValueError(f"expected a block of shape ({self.size}, p), got {tuple(V.shape)}")
        if out is not None and out.shape != V.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(V.shape)}")
        self.n_matvec += V.shape[1]
        if out is None:
            return self._matmat(V)
        return self._matmat_into(V, out)

    def _matmat_into(self, V: Tensor, out: Tensor) -> Tensor:
        return out.copy_(self._matmat(V))

    def matvec(self, v: Tensor) -> Tensor:
        """``H @ v`` for a flat vector ``v`` of length ``n``."""
        if v.ndim != 1:
            raise ValueError(f"expected a flat vector of length {self.size}, got shape {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]


class DenseOperator(LinearOperator):
    """An explicit symmetric matrix as an operator (tests, and small problems).

    Args:
        matrix: the ``(n, n)`` symmetric matrix (its dtype and device are the operator's).

    Raises:
        ValueError: ``matrix`` is not square.

    Example:
        >>> import torch
        >>> from neurothermo.curvature import DenseOperator, lanczos
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)))
        >>> lanczos(op, k=1).values.tolist()
        [3.0]
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V


class FunctionOperator(LinearOperator):
    """An operator from a function ``V (n, p) -> H V (n, p)``.

    Args:
        fn: the block product; it must return an ``(n, p)`` tensor for an ``(n, p)`` input.
        size: ``n``.
        dtype: the dtype of the vectors.
        device: their device.

    Raises:
        Nothing: at construction; products propagate what ``fn`` raises.

    Example:
        >>> import torch
        >>> from neurothermo.curvature import FunctionOperator, hutchinson
        >>> op = FunctionOperator(lambda V: 5.0 * V, 4, torch.float64, "cpu")  # H = 5·I
        >>> hutchinson(op, 8).estimate  # zᵀHz = 5·n for every ±1 probe
        20.0
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__(size, dtype, device)
        self._fn = fn

    def _matmat(self, V: Tensor) -> Tensor:
        return self._fn(V)


class CongruenceOperator(LinearOperator):
    """``D H D`` for a diagonal ``D`` (a flat vector ``d``): the preconditioned Hessian.

    With ``d = Λ^{1/2}`` (``Λ`` the diagonal of an optimizer's step ``−η Λ g``) its spectrum is that
    of ``Λ H`` (similar matrices), the curvature an adaptive method feels. Counting is delegated:
    one product here is one product of the inner operator.

    Args:
        inner: the operator ``H``.
        d: the diagonal of ``D``, a flat vector of length ``n`` (moved to ``inner``'s device
            and dtype).

    Raises:
        ValueError: ``d`` is not of shape ``(n,)``.

    Example:
        >>> import torch
        >>> from neurothermo.curvature import CongruenceOperator, DenseOperator
        >>> H = DenseOperator(torch.eye(2, dtype=torch.float64))
        >>> op = CongruenceOperator(H, torch.tensor([2.0, 3.0]))  # D H D = diag(4, 9)
        >>> op.matvec(torch.ones(2, dtype=torch.float64)).tolist()
        [4.0, 9.0]
    """

    def __init__(self, inner: LinearOperator, d: Tensor) -> None:
        if d.shape != (inner.size,):
            raise ValueError(f"diagonal has shape {tuple(d.shape)}, expected ({inner.size},)")
        super().__init__(inner.size, inner.dtype, inner.device)
        self.inner = inner
        self.d = d.to(device=inner.device, dtype=inner.dtype)

    def matmat(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        res = self.inner.matmat(self.d[:, None] * V, out=out)
        self.n_matvec = self.inner.n_matvec
        return res.mul_(self.d[:, None])


@dataclass(frozen=True)
class ParamSpace:
    """Names and shapes of a set of parameters; converts dicts of tensors to flat vectors and back.

    The flat order is the order of ``names`` (``model.named_parameters()`` order after filtering).
    Built with :meth:`of`; ``flatten`` / ``unflatten`` convert.

    Attributes:
        names: the parameter names, in flat order.
        shapes: their shapes.
        dtype: the dtype of flat vectors (the first parameter's).
        device: their device.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> ParamSpace:
        first = next(iter(params.values()))
        return cls(tuple(params), tuple(p.shape for p in params.values()), first.dtype, first.device)

    @cached_property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @cached_property
    def size(self) -> int:
        return sum(self.numels)

    @cached_property
    def _templates(self) -> tuple[Callable[[Tensor, list[Tensor]], list[Tensor]], list[Tensor]] | None:
        """The native split and shape-only (``meta``) tensors of the parameters, for ``views``; None
        when a parameter is empty (the native call returns a 1-D piece for it) or torch lacks it."""
        if min(self.numels) == 0 or _unflatten_dense is None:
            return None
        return _unflatten_dense, [torch.empty(s, device="meta") for s in self.shapes]

    def views(self, flat: Tensor) -> list[Tensor]:
        """The pieces of a flat vector in parameter shapes, in order (views: no copy).

        One native call (``unflatten_dense_tensors``: narrow + view per piece in C++) where it can;
        a Hessian-vector product needs this twice (its vector and its result), and a Python loop of
        ``view`` calls over a few dozen parameters cost ~3 % of a product on a small transformer.
        """
        native = self._templates
        if native is not None and flat.ndim == 1 and flat.shape[0] == self.size:
            return native[0](flat, native[1])
        return [c.view(s) for c, s in zip(torch.split(flat, list(self.numels)), self.shapes)]

    def flatten(self, tensors: Mapping[str, Tensor], what: str = "vector") -> Tensor:
        """Concatenate a dict ``name -> tensor`` (keys and shapes as the space's) to a flat vector."""
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self.names]
        if missing or extra:
            raise ValueError(
                f"{what} must have exactly the selected parameters as keys; "
                + (f"missing {missing[:5]}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unexpected {extra[:5]}" if extra else "")
            )
        parts = []
        for n, s in zip(self.names, self.shapes):
            t = tensors[n]
            if not isinstance(t, Tensor):
                raise TypeError(f"{what}[{n!r}] must be a tensor, got {type(t).__name__}")
            if t.shape != s:
                raise ValueError(f"{what}[{n!r}] has shape {tuple(t.shape)}, parameter has {tuple(s)}")
            parts.append(t.reshape(-1).to(device=self.device, dtype=self.dtype))
        return torch.cat(parts)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (or the leading axis of an ``(n, p)`` block) into parameter shapes.

        For a block the result has shapes ``(p, *param.shape)``.
        """
        if flat.ndim == 1:
            return dict(zip(self.names, self.views(flat)))
        p = flat.shape[1]
        return {n: c.T.reshape(p, *s) for n, c, s in
                zip(self.names, torch.split(flat, list(self.numels)), self.shapes)}

    def flatten_block(self, tensors: Mapping[str, Tensor] | list[Tensor]) -> Tensor:
        """Inverse of ``unflatten`` on blocks: ``(p, *shape)`` per parameter -> ``(n, p)``."""
        seq = list(tensors.values()) if isinstance(tensors, Mapping) else tensors
        return torch.cat([t.reshape(t.shape[0], -1) for t in seq], dim=1).T
