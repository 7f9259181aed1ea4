"""The entropic force of one minibatch: ``−(∇φ − ∇l) = −(lr/2)·H_B Λ g_B`` (THEORY.md §1).

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

from neurothermo._state import preserved_state
from neurothermo._validate import check_positive, check_scalar_loss
from neurothermo.entropic._common import (
    Params,
    as_leaves,
    batch_objective,
    check_common,
    check_n_steps,
    entropic_coefficient,
    flatten,
    grads,
    hvp,
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
    product."""
    lr = check_positive("lr", lr)
    n_steps = check_n_steps(n_steps)
    tensors, rebuild, names = flatten(params)
    leaves = as_leaves(tensors)
    lams, c = resolve(preconditioner, names, leaves)
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
) -> dict[str, Tensor]:
    """``−(∇φ − ∇l) = −(lr/2)·H_B Λ g_B`` by parameter name, for the batch.

    ``l = l_B + (wd/2)‖θ‖²`` (``g_B`` and ``H_B`` include the decay), ``Λ = I`` unless a
    preconditioner is given (a :class:`Preconditioner` with ``c ≠ 1`` multiplies by ``c``);
    ``n_steps = n`` gives the force of ``F_n`` instead, ``(1 − 1/n)`` times it. Costs one
    Hessian-vector product. The model is evaluated in its current mode and left exactly as it
    was (BatchNorm buffers, train flags, ``.grad``).

    ``batch``: data of the data model (``docs/data.md``): one batch ``(inputs, targets)`` (inputs a
    tensor or a dict of tensors) with ``l_B`` its mean loss, or an iterable of batches (a
    ``DataLoader``), then ``l_B`` is the mean over all their samples (batch m weighs ``b_m/N``; every
    batch's graph is held at once). ``loss_fn=model_loss`` when the model returns its own loss.
    """
    lr, wd = check_common(lr, weight_decay)
    params = model_parameters(model)
    objective = batch_objective(model, loss_fn, batch, weight_decay=wd)
    with preserved_state(model):
        force: dict[str, Tensor] = functional_entropic_force(
            objective, params, lr=lr, n_steps=n_steps, preconditioner=preconditioner)
    return force
