"""Gradient flow on the entropic loss: the continuous object one SGD step is compared with.

``θ̇ = −Λ∇F(θ)`` integrated for a time ``T`` with a fixed-step Runge–Kutta method, where ``F`` is
the plain objective or its entropic loss ``F_n = f + (lr/4)·c·(1 − 1/n)·∇fᵀΛ∇f``
(:func:`functional_entropic_loss`). docs/theory.md §1: the time-``lr`` flow of ``φ_lr`` matches one
step ``θ − lr·Λ·g`` to ``O(lr³)``; the flow of the plain loss only to ``O(lr²)``.

Methods: ``"euler"`` (order 1), ``"midpoint"`` (order 2), ``"rk4"`` (classical, order 4). With
``steps`` steps of size ``h = T/steps`` the integration error after time ``T`` is ``O(h^order)``.
Each stage costs one gradient of ``F`` (a double backward for the entropic loss).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from neurothermo._state import double_backward_attention, preserved_state, warn_mode
from neurothermo._validate import check_int, check_positive, check_scalar_loss
from neurothermo.entropic._common import (
    Params,
    batch_objective,
    check_common,
    check_n_steps,
    flatten,
    grads,
    model_parameters,
)
from neurothermo.entropic.loss import functional_entropic_loss
from neurothermo.entropic.preconditioner import Preconditioner, resolve

Method = Literal["euler", "midpoint", "rk4"]
METHODS: tuple[str, ...] = ("euler", "midpoint", "rk4")


def _axpy(x: list[Tensor], a: float, y: list[Tensor]) -> list[Tensor]:
    return [xi + a * yi for xi, yi in zip(x, y)]


def functional_flow(
    f: Callable[[Any], Tensor],
    params: Params,
    *,
    time: float,
    steps: int,
    method: Method = "rk4",
    lr: float | None = None,
    n_steps: int | None = None,
    preconditioner: Preconditioner | Any = None,
) -> Any:
    """Integrate ``θ̇ = −Λ∇F`` from ``params`` for ``time``; return the end point (detached, same
    structure as ``params``).

    ``F = f`` when ``lr`` is None (plain gradient flow), otherwise the entropic loss ``F_n`` of
    :func:`functional_entropic_loss` with that ``lr``, ``n_steps`` (None: n = ∞) and
    ``preconditioner`` (Λ; None: identity). ``steps`` fixed steps of ``method``.

    Args:
        f: ``f(params) -> scalar tensor``, twice differentiable when ``lr`` is given.
        params: the start θ(0): a tensor, a sequence of tensors or a dict name -> tensor.
        time: the flow time ``T`` (> 0; compare ``T = k·lr`` with k SGD steps).
        steps: the number of fixed integration steps (≥ 1), each of length ``time/steps``.
        method: ``"euler"`` or ``"rk4"``.
        lr: η of the entropic term; None for plain gradient flow on ``f``.
        n_steps: ``n`` of ``F_n`` (≥ 1); None for ``n = ∞``.
        preconditioner: Λ: None (identity), a tensor / number, a structure matching ``params``,
            or a :class:`Preconditioner` (which also carries ``c``).

    Returns:
        θ(time) in the structure of ``params`` (detached tensors).

    Raises:
        TypeError: ``params`` not floating-point tensors, non-number arguments, a preconditioner
            of another type, ``f`` not returning a tensor.
        ValueError: ``time`` or ``lr`` ≤ 0, ``steps`` or ``n_steps`` < 1, an unknown ``method``,
            ``f`` returning a non-scalar, a preconditioner that does not fit ``params``.
        FloatingPointError: ``f`` not finite at the start, or the flow diverged (non-finite
            parameters at the end: use more steps or a smaller ``lr``).

    Example:
        >>> import math
        >>> import torch
        >>> import neurothermo as nt
        >>> f = lambda w: 0.5 * (w ** 2).sum()  # flow of φ = (1/2 + lr/4)‖w‖²: w(t) = w₀·exp(−(1 + lr/2)t)
        >>> w = torch.tensor([1.0, 2.0])
        >>> wt = nt.functional_flow(f, w, time=1.0, steps=50, lr=0.1)
        >>> torch.allclose(wt, w * math.exp(-1.05), atol=1e-6)
        True
    """
    time = check_positive("time", time)
    steps = check_int("steps", steps, minimum=1)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if lr is not None:
        lr = check_positive("lr", lr)
    n_steps = check_n_steps(n_steps)
    tensors, rebuild, names = flatten(params)
    lams, _ = resolve(preconditioner, names, tensors)

    def velocity(theta: list[Tensor]) -> list[Tensor]:
        leaves = [t.detach().requires_grad_(True) for t in theta]
        if lr is None:
            value = check_scalar_loss(f(rebuild(leaves)))
        else:
            value = functional_entropic_loss(f, rebuild(leaves), lr=lr, n_steps=n_steps,
                                             preconditioner=preconditioner)
        g = grads(value, leaves)
        if lams is None:
            return [-gi for gi in g]
        return [-(lam * gi) for lam, gi in zip(lams, g)]

    h = time / steps
    theta = [t.detach() for t in tensors]
    for _ in range(steps):
        k1 = velocity(theta)
        if method == "euler":
            theta = _axpy(theta, h, k1)
        elif method == "midpoint":
            theta = _axpy(theta, h, velocity(_axpy(theta, h / 2, k1)))
        else:
            k2 = velocity(_axpy(theta, h / 2, k1))
            k3 = velocity(_axpy(theta, h / 2, k2))
            k4 = velocity(_axpy(theta, h, k3))
            theta = [t + h / 6 * (a + 2 * b + 2 * c + d)
                     for t, a, b, c, d in zip(theta, k1, k2, k3, k4)]
    if not all(bool(torch.isfinite(t).all()) for t in theta):
        raise FloatingPointError(
            f"the flow diverged (non-finite parameters after time {time} in {steps} {method} "
            "steps); use more steps (smaller step size) or a smaller lr"
        )
    return rebuild(theta)


def entropic_flow(
    model: nn.Module,
    loss_fn: Callable[..., Tensor] | None,
    batch: Any,
    *,
    lr: float,
    time: float,
    steps: int,
    method: Method = "rk4",
    weight_decay: float = 0.0,
    n_steps: int | None = None,
    preconditioner: Preconditioner | Any = None,
) -> dict[str, Tensor]:
    """End point of gradient flow for ``time`` on the batch's entropic loss, by parameter name.

    ``F = l_B + (wd/2)‖θ‖² + (lr/4)·c·(1 − 1/n)·gᵀΛg`` and ``θ̇ = −Λ∇F``; ``n_steps=None`` gives
    ``φ_lr`` (compare ``time = lr`` with one SGD step), ``n_steps=1`` plain gradient flow on
    ``l_B``. The model's parameters are not changed (the flow runs on copies) and the model is left
    exactly as it was (BatchNorm buffers, flags, ``.grad``). ``batch``: one batch or an iterable of
    batches of the data model (``docs/data.md``; ``l_B`` is then the mean over all their samples).

    Args:
        model: the network; θ(0) are its trainable parameters. Left unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        batch: one batch or an iterable of batches, as described above.
        lr: the learning rate η (> 0) of the entropic term.
        time: the flow time ``T`` (> 0).
        steps: the number of fixed integration steps (≥ 1).
        method: ``"euler"`` or ``"rk4"``.
        weight_decay: torch's ``wd`` (≥ 0): the penalty ``(wd/2)‖θ‖²``, the paper's ``γ = wd/2``.
        n_steps: ``n`` of ``F_n`` (≥ 1); None for ``φ_lr`` (n = ∞).
        preconditioner: Λ: None (identity), a dict name -> tensor, or a :class:`Preconditioner`.

    Returns:
        ``{name: θ(time)[name]}`` for every trainable parameter (detached copies).

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``loss_fn`` not callable, non-number
            arguments, a batch of the wrong type, a preconditioner of another type.
        ValueError: ``lr`` or ``time`` ≤ 0, ``weight_decay`` < 0, ``steps`` or ``n_steps`` < 1,
            an unknown ``method``, a loss that is not a scalar or not mean-reduced, a batch with
            NaN/Inf, a preconditioner missing a parameter.
        FloatingPointError: non-finite parameters or loss, or the flow diverged.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> flowed = nt.entropic_flow(model, loss_fn, (x, y), lr=0.1, time=0.1, steps=2)  # θ after time 0.1
        >>> sorted(flowed) == sorted(n for n, _ in model.named_parameters())
        True
    """
    lr, wd = check_common(lr, weight_decay)
    params = model_parameters(model)
    objective = batch_objective(model, loss_fn, batch, weight_decay=wd)
    warn_mode(model, None, "entropic_flow", batchnorm=False)
    with preserved_state(model), double_backward_attention():
        end: dict[str, Tensor] = functional_flow(
            objective, {k: p.detach() for k, p in params.items()}, time=time, steps=steps,
            method=method, lr=lr, n_steps=n_steps, preconditioner=preconditioner)
    return end
