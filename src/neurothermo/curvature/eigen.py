"""``top_eigenvalues``: the sharpness ``λ_max(∇²L)`` and its neighbours, of a model on fixed data."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

import torch
from torch import Tensor, nn

from neurothermo._state import ParamFilter, warn_mode
from neurothermo._types import EigenMethod, HvpMethod, LossFn, Mode
from neurothermo._validate import check_int, check_positive
from neurothermo.curvature.hvp import hessian_operator
from neurothermo.curvature.lanczos import RitzResult, lanczos
from neurothermo.curvature.operator import CongruenceOperator, LinearOperator, ParamSpace
from neurothermo.curvature.power import power_iteration

EIGEN_METHODS: tuple[str, ...] = get_args(EigenMethod)


@dataclass(frozen=True)
class EigenResult:
    """Top-``k`` eigenpairs of the Hessian (or of ``Λ^{1/2} H Λ^{1/2}`` with a preconditioner).

    Attributes:
        values: (k,) float64, largest first.
        vectors: one dict ``name -> tensor`` per eigenvalue (unit norm over the selected
            parameters; with a preconditioner, eigenvectors ``u`` of ``Λ^{1/2} H Λ^{1/2}``: the
            parameter-space direction is ``Λ^{1/2} u``). The tensors are views into one block
            of ``k × n`` numbers (no copy is made; ``.clone()`` one to keep or save it alone).
        residuals: (k,) ``‖H u − λ u‖``: some eigenvalue lies within it of ``values[i]``.
        errors: (k,) error estimates of ``values`` (``min(r, r²/gap)``, see ``lanczos``).
        n_hvp: Hessian-vector products used.
        converged: whether all errors reached ``tol`` (if not a ``ConvergenceWarning`` was issued).
        method: ``"lanczos"`` or ``"power"``.
        preconditioned: whether the spectrum is that of ``Λ^{1/2} H Λ^{1/2}``.
    """

    values: Tensor
    vectors: tuple[dict[str, Tensor], ...]
    residuals: Tensor
    errors: Tensor
    n_hvp: int
    converged: bool
    method: str
    preconditioned: bool

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue (the sharpness)."""
        return float(self.values[0])


def preconditioner_diagonal(space: ParamSpace, preconditioner: Any) -> Tensor:
    """Flat ``Λ^{1/2}`` from a dict ``name -> Λ`` (tensor broadcastable to the parameter, or a number)
    or from an object with such a dict as ``.diag`` (``nt.preconditioner_from(optimizer)``).

    Keys of parameters outside the selection are ignored; every selected parameter needs an entry.
    """
    diag = getattr(preconditioner, "diag", preconditioner)
    if not isinstance(diag, Mapping):
        raise TypeError("preconditioner must be a dict name -> diagonal tensor Λ (step −lr·Λ·g), "
                        f"e.g. from nt.preconditioner_from(optimizer); got {type(preconditioner).__name__}")
    parts = []
    for name, shape in zip(space.names, space.shapes):
        if name not in diag:
            raise ValueError(f"preconditioner has no entry for parameter {name!r}; it needs one per "
                             "selected parameter")
        lam = torch.as_tensor(diag[name], dtype=space.dtype, device=space.device)
        try:
            lam = torch.broadcast_to(lam, shape)
        except RuntimeError:
            raise ValueError(f"preconditioner[{name!r}] has shape {tuple(lam.shape)}, not broadcastable "
                             f"to the parameter's {tuple(shape)}") from None
        if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
            raise ValueError(f"preconditioner[{name!r}] must be finite and >= 0 (a diagonal Λ of a "
                             "step −lr·Λ·g); it has negative, NaN or Inf entries")
        parts.append(lam.reshape(-1))
    return torch.cat(parts).sqrt()


def solve(op: LinearOperator, k: int, tol: float, method: str, max_hvp: int | None,
          block_size: int | None, start: Tensor | None, seed: int | None,
          gap_after: int = 20, keep_block: bool = True) -> RitzResult:
    """Dispatch to Lanczos or power iteration on a flat operator (``keep_block``: see ``lanczos``)."""
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else seed)
    if method == "lanczos":
        return lanczos(op, k, tol=tol, max_matvec=max_hvp, block_size=block_size, start=start,
                       generator=gen, gap_after=gap_after, keep_block=keep_block)
    return power_iteration(op, k, tol=tol, max_matvec=max_hvp, generator=gen)


def top_eigenvalues(model: nn.Module, loss_fn: LossFn, data: Any, *, k: int = 1, tol: float = 1e-3,
                    method: EigenMethod = "lanczos", param_filter: ParamFilter = None,
                    preconditioner: Any = None, max_hvp: int | None = None,
                    mode: Mode = None, hvp_method: HvpMethod = "reverse",
                    microbatch_size: int | None = None, block_size: int | None = None,
                    seed: int = 0) -> EigenResult:
    """The ``k`` largest eigenvalues of ``H = ∇²_θ (1/N) Σ_i l_i`` over all samples of ``data``.

    ``method="lanczos"`` (block Lanczos, partial reorthogonalisation, thick restart; block size
    ``block_size``, default ``k``, so eigenvalues of multiplicity ≤ k are resolved) or ``"power"``
    (deflated power iteration). ``tol``: relative accuracy of each eigenvalue (error estimate ≤
    ``tol·|λ|``). ``max_hvp`` (default ``200 + 50k``) caps the Hessian-vector products; running out
    returns the estimate with its residuals and a ``ConvergenceWarning``. ``preconditioner``: dict
    ``name -> Λ`` (the diagonal of a step ``−lr·Λ·g``, or ``nt.preconditioner_from(optimizer)``): the spectrum of ``Λ^{1/2} H Λ^{1/2}``, the
    sharpness an adaptive method feels (its stability limit is ``lr·λ < 2`` like GD's). ``mode``,
    ``hvp_method``, ``microbatch_size``, ``param_filter``: as for ``hvp`` (``mode=None``: the model
    in its current train/eval flags; a ``ModeWarning`` flags train-mode BatchNorm and active
    Dropout). A float16/bfloat16 model is solved in float32 (values and vectors float32).

    Args:
        model: the network; θ are its trainable parameters selected by ``param_filter``. Left
            unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: one batch ``(inputs, targets)`` or an iterable of batches (the data model,
            ``docs/data.md``); ``H`` is of the mean loss over all N of their samples.
        k: how many of the largest eigenvalues (≥ 1).
        tol: relative accuracy of each eigenvalue (> 0).
        method: ``"lanczos"`` or ``"power"``.
        param_filter: which parameters θ spans: None (all trainable), a name prefix, a list of
            names / prefixes, or a predicate ``(name, tensor) -> bool``.
        preconditioner: None, a dict name -> Λ, or a :class:`Preconditioner`: then the spectrum
            of ``Λ^{1/2} H Λ^{1/2}``.
        max_hvp: the cap on Hessian-vector products; None for ``200 + 50k``.
        mode: None (the model's current train/eval flags), ``"train"`` or ``"eval"``.
        hvp_method: how each product is computed: ``"reverse"``, ``"forward_over_reverse"`` or
            ``"finite_difference"``.
        microbatch_size: at most this many samples per pass; None: the batches as given.
        block_size: the Lanczos block size (≥ 1); None for ``k``.
        seed: seed of the random start vectors.

    Returns:
        ``EigenResult`` (values float64, largest first, with residuals and error estimates).

    Raises:
        TypeError: ``loss_fn`` not callable, non-number or non-int arguments, data of the
            wrong type.
        ValueError: bad ``k``, ``tol``, ``method`` or ``block_size``, a loss that is not a scalar
            (e.g. ``reduction="none"``) or not mean-reduced, an unknown ``hvp_method`` or ``mode``,
            a ``param_filter`` matching nothing, ``microbatch_size`` splitting batches of train-mode
            BatchNorm, data with NaN/Inf.
        FloatingPointError: non-finite parameters or Hessian-vector products.

    Warns:
        ConvergenceWarning: ``max_hvp`` ran out before ``tol`` was met (the estimate is returned).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> eig = nt.top_eigenvalues(model, loss_fn, (x, y), k=2)
        >>> eig.values.shape, bool(eig.values[0] >= eig.values[1])
        (torch.Size([2]), True)
    """
    check_int("k", k)
    check_positive("tol", tol)
    if method not in EIGEN_METHODS:
        raise ValueError(f"method must be one of {EIGEN_METHODS}, got {method!r}")
    warn_mode(model, mode, "top_eigenvalues", fixed_masks=True)
    with hessian_operator(model, loss_fn, data, mode=mode, method=hvp_method,
                          microbatch_size=microbatch_size, param_filter=param_filter,
                          seed=seed, warn=False) as hop:
        op: LinearOperator = hop
        if preconditioner is not None:
            op = CongruenceOperator(hop, preconditioner_diagonal(hop.space, preconditioner))
        res = solve(op, k, tol, method, max_hvp, block_size, None, seed, keep_block=False)
        return to_eigen_result(res, hop.space, method, preconditioner is not None)


def to_eigen_result(res: RitzResult, space: ParamSpace, method: str, preconditioned: bool) -> EigenResult:
    # views of the solver's fresh (n, k) result: no copy of n·k numbers
    vecs = tuple({n: t.detach() for n, t in space.unflatten(res.vectors[:, i]).items()}
                 for i in range(res.vectors.shape[1]))
    return EigenResult(res.values, vecs, res.residuals, res.errors, res.n_matvec, res.converged,
                       method, preconditioned)
