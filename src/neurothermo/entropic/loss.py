"""The entropic loss of one minibatch (docs/theory.md §1).

One SGD step ``θ' = θ − η·g_B`` equals, up to ``O(η³)``, gradient flow for time ``η`` on

    φ_η(θ; B) = l_B(θ) + (η/4)·‖∇l_B(θ)‖²

(backward error analysis; without the correction the error is ``O(η²)``). Replacing the one step by
``n`` steps of size ``η/n`` on ``F_n = l_B + (η/4)(1 − 1/n)‖∇l_B‖²`` lands on the same point to
``O(η³)``; ``n → ∞`` gives ``φ_η``. With a diagonal matrix learning rate Λ (step ``θ − ηΛg``) the
term is ``(η/4)·gᵀΛg`` and the flow ``θ̇ = −Λ∇φ`` (see :mod:`.preconditioner`).

Conventions: ``l_B`` is the mean over the ``b`` samples of the batch; with ``weight_decay = wd``
(torch's) the loss is ``l_B + (wd/2)‖θ‖²`` in *both* terms, so ``g = g_B + wd·θ``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from neurothermo._state import double_backward_attention, preserved_state, warn_mode
from neurothermo._validate import check_positive, check_scalar_loss
from neurothermo.entropic._common import (
    Params,
    as_leaves,
    batch_objective,
    check_common,
    check_n_steps,
    dot,
    entropic_coefficient,
    flatten,
    grads,
    model_parameters,
)
from neurothermo.entropic.preconditioner import Preconditioner, resolve


def functional_entropic_loss(
    f: Callable[[Any], Tensor],
    params: Params,
    *,
    lr: float,
    n_steps: int | None = None,
    preconditioner: Preconditioner | Any = None,
) -> Tensor:
    """``F_n(θ) = f(θ) + (lr/4)·c·(1 − 1/n)·∇f(θ)ᵀ Λ ∇f(θ)``, differentiable in θ (pure).

    ``f(params) -> scalar tensor`` is any twice-differentiable function; ``params`` is a tensor, a
    sequence of tensors or a dict of tensors, passed to ``f`` in the same structure. ``n = ∞`` when
    ``n_steps`` is None (then ``F = φ_lr``); ``n_steps=1`` gives ``f`` itself. ``preconditioner``
    is Λ (None: Λ = I): a tensor / number, a structure matching ``params``, or a
    :class:`Preconditioner` (which also carries the factor ``c``; otherwise ``c = 1``).

    The gradient is taken with ``create_graph=True``, so the result can be differentiated again
    (its gradient is ``∇f + (lr/2)·c·(1 − 1/n)·H Λ ∇f``). Tensors in ``params`` that require grad
    are used as they are, so gradients of the result reach them; others are replaced by leaf copies.

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
        The scalar tensor ``F_n(θ)``, with its graph (``create_graph=True``).

    Raises:
        TypeError: ``params`` not tensors / not floating point, a non-number ``lr``, a
            preconditioner of another type, or ``f`` not returning a tensor.
        ValueError: ``lr`` ≤ 0 or not finite, ``n_steps`` < 1, a preconditioner missing a
            parameter or of a shape that does not broadcast, ``f`` returning a non-scalar.
        FloatingPointError: ``f`` or the result is not finite at ``params``.

    Example:
        >>> import torch
        >>> import neurothermo as nt
        >>> f = lambda w: 0.5 * (w ** 2).sum()           # ∇f = w
        >>> w = torch.tensor([1.0, 2.0])
        >>> float(nt.functional_entropic_loss(f, w, lr=0.1))  # f + (lr/4)‖∇f‖² = 2.5 + 0.025·5
        2.625
    """
    lr = check_positive("lr", lr)
    n_steps = check_n_steps(n_steps)
    tensors, rebuild, names = flatten(params)
    leaves = as_leaves(tensors)
    lams, c = resolve(preconditioner, names, leaves)
    coef = entropic_coefficient(lr, n_steps, c)
    with double_backward_attention():  # the result is differentiated again: math SDPA kernel
        value = check_scalar_loss(f(rebuild(leaves)))
        if coef == 0.0:
            return value
        g = grads(value, leaves, create_graph=True)
    lam_g = g if lams is None else [lam * gi for lam, gi in zip(lams, g)]
    return check_scalar_loss(value + coef * dot(lam_g, g))  # a finite loss can have ∇ = ∞


def entropic_loss(
    model: nn.Module,
    loss_fn: Callable[..., Tensor] | None,
    batch: Any,
    *,
    lr: float,
    weight_decay: float = 0.0,
    n_steps: int | None = None,
    preconditioner: Preconditioner | Any = None,
) -> Tensor:
    """``l_B + (wd/2)‖θ‖² + (lr/4)·c·(1 − 1/n)·gᵀΛg`` for the batch, as a scalar tensor.

    ``g = ∇l_B + wd·θ`` over every trainable parameter of ``model``; the value is differentiable
    (``.backward()`` puts ``∇F_n`` into the parameters' ``.grad``), so a model can be trained on it
    directly. When ``weight_decay > 0`` the value includes the penalty ``(wd/2)‖θ‖²``: train it with
    an optimizer whose own weight decay is 0. ``n_steps``: None for ``φ_lr`` (n = ∞), ``n`` for
    ``F_n``. ``preconditioner``: None (Λ = I), a dict name -> tensor, or a :class:`Preconditioner`.

    The model is evaluated in its current mode (a training objective; active Dropout makes it
    random, which a ``ModeWarning`` says); BatchNorm running statistics, train flags and ``.grad``
    are restored exactly, so the call itself changes nothing on the model. Attention runs in the
    twice-differentiable math kernel.

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
        n_steps: ``n`` of ``F_n`` (≥ 1); None for ``φ_lr`` (n = ∞).
        preconditioner: Λ: None (Λ = I), a dict name -> tensor, or a :class:`Preconditioner`.

    Returns:
        The scalar tensor ``F_n(θ)``, differentiable in the model's parameters.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``loss_fn`` not callable, a non-number ``lr``
            or ``weight_decay``, a batch of the wrong type, a preconditioner of another type.
        ValueError: a loss that is not a scalar or not mean-reduced, ``lr`` ≤ 0,
            ``weight_decay`` < 0, ``n_steps`` < 1, a batch with NaN/Inf, a preconditioner missing
            a parameter.
        FloatingPointError: non-finite parameters, loss or result.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> phi = nt.entropic_loss(model, loss_fn, (x, y), lr=0.1)
        >>> loss = loss_fn(model(x), y)  # φ = l_B + (lr/4)‖∇l_B‖²
        >>> g = torch.autograd.grad(loss, list(model.parameters()))
        >>> torch.allclose(phi, loss + 0.1 / 4 * sum((t ** 2).sum() for t in g))
        True
    """
    lr, wd = check_common(lr, weight_decay)
    n_steps = check_n_steps(n_steps)
    params = model_parameters(model)
    objective = batch_objective(model, loss_fn, batch, weight_decay=wd)
    warn_mode(model, None, "entropic_loss", batchnorm=False)
    with preserved_state(model):
        return functional_entropic_loss(objective, params, lr=lr, n_steps=n_steps,
                                        preconditioner=preconditioner)
