"""The entropic force of one minibatch: ``−(∇φ − ∇l) = −(lr/2)·H_B Λ g_B`` (docs/theory.md §1).

One Hessian-vector product (double backward): ``g = ∇l`` is built with ``create_graph=True`` and
``H·(Λg) = ∇⟨g, stop_grad(Λg)⟩``. With weight decay ``wd`` the loss is ``l_B + (wd/2)‖θ‖²``, so
``g = g_B + wd·θ`` and ``H = H_B + wd·I``. With a :class:`Preconditioner` carrying ``c ≠ 1`` (the
heavy-ball approximation) the force is ``−(lr/2)·c·HΛg``.

Reverse-over-reverse on purpose: the vector is the gradient itself, which the graph-building
backward yields for free, whereas forward-over-reverse (``jvp`` of ``grad``) needs ``g`` before it
starts, i.e. one more forward + backward (on an MLP ~1.4× the multiply-adds; measured ~2× slower
through ``torch.func`` on CPU, ``benchmarks/bench_entropic.py``). The cost is one forward, one
backward with graph and one double backward, ~2.5 plain steps of arithmetic.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from neurothermo._state import (
    as_float32,
    double_backward_attention,
    float32_copy,
    frozen_rows,
    preserved_state,
    warn_mode,
    zero_frozen_rows,
)
from neurothermo._types import Mode
from neurothermo._validate import check_positive, check_scalar_loss
from neurothermo.curvature.hvp import double_backward_hvp as hvp  # the one HVP kernel
from neurothermo.entropic._common import (
    Params,
    as_leaves,
    batch_objective,
    check_common,
    check_n_steps,
    entropic_coefficient,
    flatten,
    grads,
    model_parameters,
)
from neurothermo.entropic.preconditioner import Preconditioner, resolve


def functional_entropic_force(
    f: Callable[[Any], Tensor],
    params: Params,
    *,
    lr: float,
    n_steps: int | None = None,
    preconditioner: Preconditioner | Any = None,
) -> Any:
    """``−(lr/2)·c·(1 − 1/n)·H Λ ∇f`` at ``params`` (same structure as ``params``, detached),
    ``H`` the Hessian of ``f``: the difference ``−(∇F_n − ∇f)`` of the entropic loss of
    :func:`functional_entropic_loss` (``n = ∞`` when ``n_steps`` is None). One Hessian-vector
    product.

    Args:
        f: ``f(params) -> scalar tensor``, any twice-differentiable function of ``params`` (for a
            model: its mean-reduced batch loss ``l_B``, plus ``(wd/2)‖θ‖²`` if decay is meant).
        params: the point θ: a tensor, a sequence of tensors or a dict name -> tensor, passed to
            ``f`` in that structure. Floating point.
        lr: the learning rate η (> 0).
        n_steps: ``n`` of ``F_n`` (≥ 1); None for ``n = ∞`` (``φ_lr``).
        preconditioner: Λ. None (Λ = I), a tensor / number, a structure matching ``params``, or a
            :class:`Preconditioner` (which also carries ``c``; otherwise ``c = 1``).

    Returns:
        ``−(lr/2)·c·(1 − 1/n)·H Λ ∇f`` in the structure of ``params`` (detached tensors).

    Raises:
        TypeError: ``params`` not tensors / not floating point, a non-number ``lr``, a
            preconditioner of another type, or ``f`` not returning a tensor.
        ValueError: ``lr`` ≤ 0 or not finite, ``n_steps`` < 1, a preconditioner missing a
            parameter or of a shape that does not broadcast, ``f`` returning a non-scalar.
        FloatingPointError: ``f`` is not finite at ``params``.

    Example:
        >>> import torch
        >>> import neurothermo as nt
        >>> f = lambda w: 0.5 * (w ** 2).sum()           # H = I, g = w
        >>> w = torch.tensor([1.0, 2.0])
        >>> nt.functional_entropic_force(f, w, lr=0.1)   # −(lr/2)·H·g
        tensor([-0.0500, -0.1000])
    """
    lr = check_positive("lr", lr)
    n_steps = check_n_steps(n_steps)
    tensors, rebuild, names = flatten(params)
    leaves = as_leaves(tensors)
    lams, c = resolve(preconditioner, names, leaves)
    with double_backward_attention():  # fused attention kernels have no second derivative
        value = check_scalar_loss(f(rebuild(leaves)))
        g = grads(value, leaves, create_graph=True)
        if lams is None:
            v = [gi.detach() for gi in g]
        else:
            v = [lam * gi.detach() for lam, gi in zip(lams, g)]
        hv = hvp(g, leaves, v)
    scale = -2.0 * entropic_coefficient(lr, n_steps, c)  # −(lr/2)·c·(1 − 1/n)
    return rebuild([h.mul_(scale) for h in hv])


def entropic_force(
    model: nn.Module,
    loss_fn: Callable[..., Tensor] | None,
    batch: Any,
    *,
    lr: float,
    weight_decay: float = 0.0,
    preconditioner: Preconditioner | Any = None,
    n_steps: int | None = None,
    mode: Mode = None,
) -> dict[str, Tensor]:
    """``−(∇φ − ∇l) = −(lr/2)·H_B Λ g_B`` by parameter name, for the batch.

    ``l = l_B + (wd/2)‖θ‖²`` (``g_B`` and ``H_B`` include the decay), ``Λ = I`` unless a
    preconditioner is given (a :class:`Preconditioner` with ``c ≠ 1`` multiplies by ``c``);
    ``n_steps = n`` gives the force of ``F_n`` instead, ``(1 − 1/n)`` times it. Costs one
    Hessian-vector product. ``mode``: None (default: the model in its current train/eval flags),
    "train" or "eval" for this call (docs/conventions.md); a ``ModeWarning`` flags train-mode
    BatchNorm under ``mode=None`` and active Dropout (then the force is random). Attention runs
    in a twice-differentiable kernel; a float16/bfloat16 model is evaluated on a float32 copy
    (float32 result). The model is left exactly as it was (BatchNorm buffers, train flags,
    ``.grad``, the caller's attention-kernel choice).


    ``batch``: data of the data model (``docs/data.md``): one batch ``(inputs, targets)`` (inputs a
    tensor or a dict of tensors) with ``l_B`` its mean loss, or an iterable of batches (a
    ``DataLoader``), then ``l_B`` is the mean over all their samples (batch m weighs ``b_m/N``; every
    batch's graph is held at once). ``loss_fn=model_loss`` when the model returns its own loss.

    Args:
        model: the network; θ are its trainable parameters. Left unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        batch: one batch or an iterable of batches, as described above.
        lr: the learning rate η (> 0).
        weight_decay: torch's ``wd`` (≥ 0): the penalty ``(wd/2)‖θ‖²``, the paper's ``γ = wd/2``.
        preconditioner: Λ: None (Λ = I), a dict name -> tensor, or a :class:`Preconditioner`.
        n_steps: ``n`` of ``F_n`` (≥ 1); None for ``n = ∞``.
        mode: None, ``"train"`` or ``"eval"``, as described above.

    Returns:
        ``{name: −(lr/2)·c·(1 − 1/n)·(H_B Λ g_B)[name]}`` for every trainable parameter (detached;
        float32 for a half-precision model).

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``loss_fn`` not callable, a non-number ``lr``
            or ``weight_decay``, a batch of the wrong type, a preconditioner of another type.
        ValueError: a loss that is not a scalar or not mean-reduced, a bad ``mode``, ``lr`` ≤ 0,
            ``weight_decay`` < 0, ``n_steps`` < 1, a batch with NaN/Inf or mismatched sizes, a
            preconditioner missing a parameter.
        FloatingPointError: non-finite parameters or loss.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> force = nt.entropic_force(model, loss_fn, (x, y), lr=0.1)  # −(lr/2)·H_B·g_B per parameter
        >>> {name: tuple(f.shape) for name, f in force.items()}
        {'0.weight': (8, 4), '0.bias': (8,), '2.weight': (3, 8), '2.bias': (3,)}
    """
    lr, wd = check_common(lr, weight_decay)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    warn_mode(model, mode, "entropic_force")
    with float32_copy(model) as m, preserved_state(m, mode):
        params = model_parameters(m)
        objective = batch_objective(m, loss_fn, as_float32(batch), weight_decay=wd)
        force: dict[str, Tensor] = functional_entropic_force(
            objective, params, lr=lr, n_steps=n_steps, preconditioner=preconditioner)
        zero_frozen_rows(force, frozen_rows(m))  # padding rows never train: P H P (see _state)
    return force
