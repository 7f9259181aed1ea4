"""Hessian-vector products of the mean loss over a fixed data set, three ways.

Convention (docs/theory.md): ``loss_fn(outputs, targets)`` is mean-reduced over its batch. The Hessian is
that of the **mean loss over all N samples of ``data``**,

    L(θ) = (1/N) Σ_i l_i(θ) = Σ_m (b_m / N) · l_{B_m}(θ),     H = ∇²L,

where ``data`` is cut into microbatches ``B_m`` of sizes ``b_m`` (``microbatch_size``, the last one
possibly smaller): each microbatch's Hessian-vector product is weighted by its size, so the result
does not depend on ``microbatch_size`` (up to rounding). ``data`` follows the data model
(``docs/data.md``): one batch ``(inputs, targets)`` (inputs a tensor or a dict of tensors; the inputs
alone with ``loss_fn=model_loss``) or an iterable of batches, e.g. a ``DataLoader`` (sizes may differ;
they are weighted by size too; the batches are read once and held on the model's device).

Methods (all give ``H v``; tests check they agree):

* ``"reverse"``: double backward, ``∂/∂θ (∇L · v)`` through ``torch.autograd.grad``. When the data
  is a single microbatch the first-order graph is built once and reused by every product (as
  PyHessian does), so an iterative solver pays one backward-of-backward per product.
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` (no graph kept between calls;
  less memory than double backward on large models, on small CPU models the torch.func overhead shows).
* ``"finite_difference"``: central difference ``(∇L(θ + h v) − ∇L(θ − h v)) / (2h)``, error
  ``(h²/6)·∂³_t ∇L(θ + t v)|₀ + O(h⁴)`` from truncation and ``≈ ε_mach·‖∇L‖/h`` from rounding; the
  default ``h = ε_mach^{1/3} / ‖v‖`` balances the two (perturbation of norm ``ε_mach^{1/3}``).

Mode (the rule of every measurement, docs/conventions.md): ``mode=None`` (default) takes the
model as it is, ``"train"`` or ``"eval"`` sets every module's flag for the call. In train mode
BatchNorm uses batch statistics without updating its running statistics, and random layers (dropout)
draw the same masks in every product (a fixed seed per microbatch), so the operator is a fixed
symmetric matrix. A ``ModeWarning`` says when the value depends on the mode (train-mode BatchNorm
under ``mode=None``) or on dropout masks. The model's flags, buffers and ``.grad`` are restored
exactly afterwards (``_state.preserved_state``).

Attention: every product runs with the math backend of ``F.scaled_dot_product_attention`` (the fused
kernels have no second derivative) and ``nn.MultiheadAttention``'s fast path off; the caller's
selection is restored on exit (``_state.double_backward_attention``).

Precision: a model with float16/bfloat16 parameters is measured on a float32 copy (its exact weights,
float32 arithmetic, floating inputs cast to float32); results are float32 (``_state.float32_copy``).

Graph reuse: with ``method="reverse"`` the first-order graph (``∇L`` with ``create_graph=True``) of
every microbatch is built once and every product is one backward through it, as PyHessian does,
when the graphs fit the memory budget (``cache_budget``: measured from the saved tensors of the first
microbatch's graph against half the free memory of the device); otherwise each product rebuilds its
microbatch's graph (forward + backward + double backward) and memory stays at one graph.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, get_args

import torch
from torch import Tensor, nn

from neurothermo._data import Batch, as_data
from neurothermo._state import (
    ParamFilter,
    as_float32,
    float32_copy,
    frozen_rows,
    has_train_mode_batchnorm,
    select_parameters,
    warn_mode,
)
from neurothermo._types import HvpMethod, LossFn, Mode
from neurothermo._validate import check_finite_params, check_int, check_loss_fn, check_positive
from neurothermo.curvature.functional_hvp import (
    FunctionalLoss,
    finite_difference,
    forward_over_reverse,
    functional_loss,
)
from neurothermo.curvature.graph_memory import SavedBytes, graph_budget
from neurothermo.curvature.measurement import _fixed_rng, measurement_mode, microbatches
from neurothermo.curvature.operator import LinearOperator, ParamSpace, column_block

HVP_METHODS: tuple[str, ...] = get_args(HvpMethod)


def double_backward_hvp(grads: Sequence[Tensor | None], inputs: Sequence[Tensor],
                        v: Sequence[Tensor], *, retain_graph: bool = False) -> list[Tensor]:
    """``H·v = ∇_θ ⟨g, v⟩``: the Hessian-vector product by one double backward (the package's one
    kernel for it; ``HessianOperator``'s ``"reverse"`` products and the entropic force use it).

    Args:
        grads: ``g = ∇_θ f``, one entry per input, built with ``create_graph=True``; an entry that is
            ``None`` or does not depend on the inputs contributes nothing.
        inputs: the tensors θ the gradient was taken with respect to.
        v: the vector, one tensor per input, shaped like it.
        retain_graph: keep the first-order graph for further products.

    Returns:
        ``H v`` per input (zeros where the result does not depend on an input; all zeros when
        ``f`` is linear in θ, ``H = 0``).
    """
    pairs = [(g, vi) for g, vi in zip(grads, v) if g is not None and g.requires_grad]
    if not pairs:  # f linear (or constant) in the inputs: H = 0
        return [torch.zeros_like(p) for p in inputs]
    hv = torch.autograd.grad([g for g, _ in pairs], list(inputs), grad_outputs=[vi for _, vi in pairs],
                             retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(inputs, hv)]


class HessianOperator(LinearOperator):
    """``v ↦ H v`` for the mean loss of ``model`` over ``data`` (see the module docstring).

    Build it through ``hessian_operator(...)`` (a context manager that sets the mode and restores the
    model afterwards), not directly. ``space`` maps flat vectors to parameter dicts.

    Args:
        model: the network; θ are its trainable parameters selected by ``param_filter``.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: one batch or an iterable of batches (``docs/data.md``); ``H`` is of the mean loss
            ``(1/N) Σ_i l_i`` over all N samples (microbatches weighted ``b_m/N``).
        method: ``"reverse"``, ``"forward_over_reverse"`` or ``"finite_difference"``.
        microbatch_size: at most this many samples per pass (≥ 1); None: the batches as given.
        param_filter: which parameters θ spans: None (all trainable), a name prefix, a list of
            names / prefixes, or a predicate ``(name, tensor) -> bool``.
        fd_step: ``h`` of the finite difference (> 0); None: ``ε_mach^{1/3}/‖v‖``.
        cache: keep the first-order graphs for every product; None: when they fit in memory.
        seed: seed of the fixed dropout masks (train mode).

    Raises:
        TypeError: ``loss_fn`` not callable, non-number arguments, data of the wrong type.
        ValueError: an unknown ``method``, ``microbatch_size`` < 1, ``fd_step`` ≤ 0, a
            ``param_filter`` matching nothing, ``microbatch_size`` splitting batches of
            train-mode BatchNorm, data with NaN/Inf; products raise it for a loss that is not a
            scalar.
        FloatingPointError: non-finite parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from neurothermo.curvature import HessianOperator, hessian_operator
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> with hessian_operator(model, nn.MSELoss(), (x, y)) as op:
        ...     isinstance(op, HessianOperator), op.size  # 3 weights + 1 bias
        (True, 4)
    """

    # Keep each product's result (the tensors autograd returned, already copied into the caller's
    # column) alive until the next product has been computed, at the cost of n numbers held. On the
    # CPU, freeing it at once left the allocator's heap with nothing live above a product's
    # temporaries, so glibc's malloc returned them to the kernel after every product and the next
    # one faulted them in again: measured on ResNet-18 (11.2 M parameters, b = 16) inside a
    # Lanczos solve, 23–32 k page faults per product instead of 16–18 k (11 k of those are the
    # solver's new basis column; PyHessian 8–9 k), 45–55 ms of system time per product instead of
    # 35–40 ms (benchmarks/bench_curvature_hvp.py). Power iteration (PyHessian) holds its vector
    # between products and so avoids this by construction.
    hold_last_product: bool = True

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, *,
                 method: HvpMethod = "reverse", microbatch_size: int | None = None,
                 param_filter: ParamFilter = None, fd_step: float | None = None,
                 cache: bool | None = None, seed: int = 0) -> None:
        check_loss_fn(loss_fn)
        if method not in HVP_METHODS:
            raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
        if microbatch_size is not None:
            check_int("microbatch_size", microbatch_size)
        if fd_step is not None:
            check_positive("fd_step", fd_step)
        self.params = select_parameters(model, param_filter)
        check_finite_params(model)
        self.space = ParamSpace.of(self.params)
        super().__init__(self.space.size, self.space.dtype, self.space.device)
        batches = as_data(data, loss_fn, name="data", model=model)
        self.chunks = [(c.to(self.device).map(as_float32), w)
                       for c, w in microbatches(batches, microbatch_size)]
        if len(self.chunks) > (batches.n_batches or 0) and (bn := has_train_mode_batchnorm(model)):
            raise ValueError(
                f"microbatch_size={microbatch_size} splits batches, but BatchNorm {bn!r} is in train "
                "mode: its batch statistics would change with the split (a different loss). Use "
                "mode='eval', or pass the batches as a list without microbatch_size"
            )
        self.model, self.loss_fn, self.method = model, loss_fn, method
        self.fd_step, self.seed = fd_step, seed
        self._plist = list(self.params.values())
        # rows of padding embeddings never train: the operator is P H P (``_state.frozen_rows``)
        rows = {n: i for n, i in frozen_rows(model).items() if n in self.params}
        self._mask: Tensor | None = None
        if rows:
            mask = {n: torch.ones_like(p) for n, p in self.params.items()}
            for n, i in rows.items():
                mask[n][i] = 0
            self._mask = self.space.flatten(mask, "mask")
        self._train = model.training
        self._cache = cache
        self._grads: list[list[Tensor | None]] | None = None
        self.graph_bytes: int | None = None  # measured size of one microbatch's graph
        self._last_product: list[Tensor] | None = None
        self.loss = self._init_losses()
        self.cached = self._grads is not None  # every product reuses the first-order graphs

    # -- helpers --------------------------------------------------------------------------------
    def _rng(self, i: int) -> AbstractContextManager[Any]:
        return _fixed_rng(self.device, self.seed + i) if self._train else nullcontext()

    def _loss(self, i: int, batch: Batch) -> Tensor:
        with self._rng(i):
            return batch.loss(self.model, self.loss_fn)

    def _graph_grads(self, i: int, batch: Batch) -> tuple[Tensor, list[Tensor | None]]:
        loss = self._loss(i, batch)
        grads = torch.autograd.grad(loss, self._plist, create_graph=True, allow_unused=True)
        return loss, list(grads)

    def _init_losses(self) -> float:
        """The loss over ``data``; with ``method="reverse"`` also the first-order graphs, kept when
        ``cache`` is True, or None and they fit (one microbatch always: a product rebuilds the same
        graph anyway; several when ``chunks × bytes of the first ≤ graph_budget``)."""
        total = 0.0
        reuse = self.method == "reverse" and self._cache is not False
        grads_cache: list[list[Tensor | None]] = []
        for i, (batch, w) in enumerate(self.chunks):
            if reuse:
                if i == 0 and self._cache is None and len(self.chunks) > 1:
                    meter = SavedBytes(self._plist)
                    with meter:
                        loss, grads = self._graph_grads(i, batch)
                    self.graph_bytes = meter.bytes
                    if meter.bytes * len(self.chunks) > graph_budget(self.device):
                        reuse = False
                        grads = []
                else:
                    loss, grads = self._graph_grads(i, batch)
                if reuse:
                    grads_cache.append(grads)
            else:
                with torch.no_grad():
                    loss = self._loss(i, batch)
            total += w * float(loss.detach())
        if reuse:
            self._grads = grads_cache
        return total

    def release(self) -> None:
        """Drop the cached first-order graph (and the last product's result, ``hold_last_product``)."""
        self._grads = None
        self._last_product = None

    def _functional_loss(self, i: int, batch: Batch) -> FunctionalLoss:
        return functional_loss(self.model, self.loss_fn, batch, lambda: self._rng(i))

    # -- the three products ---------------------------------------------------------------------
    def _reverse(self, i: int, batch: Batch, v: list[Tensor]) -> list[Tensor]:
        if self._grads is not None:
            grads, retain = self._grads[i], True
        else:
            grads, retain = self._graph_grads(i, batch)[1], False
        return double_backward_hvp(grads, self._plist, v, retain_graph=retain)

    def _forward_over_reverse(self, i: int, batch: Batch, v: list[Tensor]) -> list[Tensor]:
        return forward_over_reverse(self._functional_loss(i, batch), self.params, self.space.names,
                                    batch.targets, v)

    def _finite_difference(self, i: int, batch: Batch, v: list[Tensor]) -> list[Tensor]:
        return finite_difference(self._functional_loss(i, batch), self.params, self.space.names,
                                 batch.targets, v, self.fd_step, self.dtype)

    def _matmat(self, V: Tensor) -> Tensor:
        # stored by columns, like the bases that multiply it (large CPU blocks in huge pages)
        return self._matmat_into(V, column_block(V.shape[0], V.shape[1], V.dtype, V.device, zero=False))

    def _matmat_into(self, V: Tensor, out_cols: Tensor) -> Tensor:
        product = {"reverse": self._reverse, "forward_over_reverse": self._forward_over_reverse,
                   "finite_difference": self._finite_difference}[self.method]
        rows = V.T.contiguous()  # no copy when V is stored by columns (operator.column_block)
        if self._mask is not None:
            rows = rows * self._mask
        out = out_cols.T  # (p, n); a view when out_cols is stored by columns
        for j in range(V.shape[1]):
            v = self.space.views(rows[j])
            dest = self.space.views(out[j])  # views of out[j]
            for i, (batch, w) in enumerate(self.chunks):
                # one pass per piece, whatever its memory layout (reshape + cat: two for strided
                # ones), all pieces in one call
                hv = product(i, batch, v)  # plain tensors: no graph is built for them
                with torch.no_grad():
                    if i == 0:
                        torch._foreach_copy_(dest, hv)
                    else:
                        torch._foreach_add_(dest, hv, alpha=w)
                if self.hold_last_product:
                    self._last_product = hv  # freed only once the next product exists: see there
                if i == 0 and w != 1.0:
                    out[j].mul_(w)
        if self._mask is not None:
            out.mul_(self._mask)
        return out_cols


@contextmanager
def hessian_operator(model: nn.Module, loss_fn: LossFn, data: Any, *, mode: Mode = None,
                     method: HvpMethod = "reverse", microbatch_size: int | None = None,
                     param_filter: ParamFilter = None, fd_step: float | None = None,
                     cache: bool | None = None, seed: int = 0,
                     warn: bool = True) -> Iterator[HessianOperator]:
    """Context manager yielding a ``HessianOperator``; the model is restored exactly on exit.

    ``mode``: None (the model's current flags), "train" or "eval" (module docstring); ``warn``:
    issue the ``ModeWarning``s here (the public functions issue their own and pass False).
    ``cache``: keep the first-order graphs for every product (None: when they fit in memory).

    Args:
        model: the network; θ are its trainable parameters selected by ``param_filter``.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: one batch or an iterable of batches (``docs/data.md``); ``H`` is of the mean loss
            ``(1/N) Σ_i l_i`` over all N samples (microbatches weighted ``b_m/N``).
        mode: None (the model's current flags), ``"train"`` or ``"eval"``.
        method: ``"reverse"``, ``"forward_over_reverse"`` or ``"finite_difference"``.
        microbatch_size: at most this many samples per pass (≥ 1); None: the batches as given.
        param_filter: which parameters θ spans: None (all trainable), a name prefix, a list of
            names / prefixes, or a predicate ``(name, tensor) -> bool``.
        fd_step: ``h`` of the finite difference (> 0); None: ``ε_mach^{1/3}/‖v‖``.
        cache: keep the first-order graphs for every product; None: when they fit in memory.
        seed: seed of the fixed dropout masks (train mode).
        warn: issue the mode warnings here (the public functions issue their own).

    Yields:
        The :class:`HessianOperator` (flat vectors in ``op.space`` order); its products run in
        ``mode`` on a float32 copy of a half-precision model.

    Raises:
        TypeError: ``loss_fn`` not callable, non-number arguments, data of the wrong type.
        ValueError: an unknown ``method`` or ``mode``, ``microbatch_size`` < 1, ``fd_step`` ≤ 0, a
            ``param_filter`` matching nothing, ``microbatch_size`` splitting batches of
            train-mode BatchNorm, data with NaN/Inf; products raise it for a loss that is not a
            scalar.
        FloatingPointError: non-finite parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from neurothermo.curvature import hessian_operator
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x, y = torch.eye(2), torch.zeros(2, 1)
        >>> with hessian_operator(model, nn.MSELoss(), (x, y)) as op:  # L = (w₁² + w₂²)/2: H = I
        ...     op.matvec(torch.tensor([1.0, 2.0])).tolist()
        [1.0, 2.0]
    """
    if warn:
        warn_mode(model, mode, "hessian_operator", fixed_masks=True, stacklevel=4)
    with float32_copy(model) as m, measurement_mode(m, mode):
        op = HessianOperator(m, loss_fn, data, method=method, microbatch_size=microbatch_size,
                             param_filter=param_filter, fd_step=fd_step, cache=cache, seed=seed)
        try:
            yield op
        finally:
            op.release()


def hvp(model: nn.Module, loss_fn: LossFn, data: Any, vector: Mapping[str, Tensor] | Tensor, *,
        method: HvpMethod = "reverse", microbatch_size: int | None = None,
        param_filter: ParamFilter = None, mode: Mode = None,
        fd_step: float | None = None) -> dict[str, Tensor]:
    """Hessian-vector product ``H v`` of the mean loss over all samples of ``data``.

    ``H = ∇²_θ (1/N) Σ_i l_i`` over the parameters selected by ``param_filter`` (others are held
    fixed); microbatches are weighted by their size (module docstring). ``vector`` is a dict
    ``name -> tensor`` with exactly the selected parameters' names and shapes (or a flat tensor in
    ``model.named_parameters()`` order). Returns a dict of the same form. ``fd_step`` is ``h`` of the
    finite difference (default ``ε_mach^{1/3}/‖v‖``). ``mode``: None (the model as it is),
    "train" or "eval" (module docstring). A float16/bfloat16 model is evaluated in float32 and the
    result is float32.

    Args:
        model: the network; θ are its trainable parameters selected by ``param_filter``. Left
            unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: one batch ``(inputs, targets)`` or an iterable of batches (the data model,
            ``docs/data.md``); ``H`` is of the mean loss over all N of their samples.
        vector: ``v``: a dict name -> tensor over exactly the selected parameters, or a flat
            tensor in ``model.named_parameters()`` order.
        method: ``"reverse"`` (double backward), ``"forward_over_reverse"`` or
            ``"finite_difference"``.
        microbatch_size: at most this many samples per pass (≥ 1; microbatches weighted
            ``b_m/N``); None: the batches as given.
        param_filter: which parameters θ spans: None (all trainable), a name prefix, a list of
            names / prefixes, or a predicate ``(name, tensor) -> bool``.
        mode: None (the model's current train/eval flags), ``"train"`` or ``"eval"``.
        fd_step: ``h`` of the finite difference (> 0); None for ``ε_mach^{1/3}/‖v‖``.

    Returns:
        ``{name: (H v)[name]}`` over the selected parameters (detached; float32 for a
        half-precision model).

    Raises:
        TypeError: ``vector`` neither a dict nor a tensor, ``loss_fn`` not callable, non-number
            arguments, data of the wrong type.
        ValueError: a loss that is not a scalar (e.g. ``reduction="none"``) or not mean-reduced,
            a vector of the wrong names / shapes or with NaN/Inf, an unknown ``method`` or
            ``mode``, a ``param_filter`` matching nothing.
        FloatingPointError: non-finite parameters or products.
        RuntimeError: ``method="forward_over_reverse"`` on an operation without a forward-mode
            derivative (use ``method="reverse"``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        >>> hv = nt.hvp(model, loss_fn, (x, y), v)  # H v of the mean loss
        >>> hv["0.weight"].shape
        torch.Size([8, 4])
    """
    warn_mode(model, mode, "hvp", fixed_masks=True)
    with hessian_operator(model, loss_fn, data, mode=mode, method=method,
                          microbatch_size=microbatch_size, param_filter=param_filter,
                          fd_step=fd_step, cache=False, warn=False) as op:
        if isinstance(vector, Mapping):
            v = op.space.flatten(vector, "vector")
        elif isinstance(vector, Tensor):
            if vector.shape != (op.size,):
                raise ValueError(f"flat vector has shape {tuple(vector.shape)}; expected ({op.size},)")
            v = vector.to(device=op.device, dtype=op.dtype)
        else:
            raise TypeError(f"vector must be a dict name -> tensor or a flat tensor, got {type(vector).__name__}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("vector contains NaN or Inf")
        out = op.matvec(v)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                "the Hessian-vector product contains NaN or Inf although loss and vector are finite; "
                "the loss is not twice differentiable here (e.g. sqrt or log at 0) or overflows"
            )
        return {n: t.clone() for n, t in op.space.unflatten(out).items()}
