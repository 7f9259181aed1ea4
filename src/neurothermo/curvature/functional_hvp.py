"""Hessian-vector products through ``torch.func``, no graph kept between products: forward over
reverse (``jvp`` of ``grad``) and the central finite difference of ``grad`` (``hvp.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from neurothermo._data import Batch, resolve_loss_fn
from neurothermo._types import LossFn
from neurothermo._validate import check_scalar_loss

FunctionalLoss = Callable[[dict[str, Tensor], Any], Tensor]


def functional_loss(model: nn.Module, loss_fn: LossFn, batch: Batch,
                    rng: Callable[[], AbstractContextManager[Any]]) -> FunctionalLoss:
    """``(params, targets) ↦`` the loss of ``model`` on ``batch`` with ``params`` swapped in (each
    forward inside a fresh ``rng()``)."""
    def f(p: dict[str, Tensor], target: Any) -> Tensor:
        with rng():
            out = functional_call(model, p, batch.args, batch.kwargs)
        loss = resolve_loss_fn(loss_fn)(out, target)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            check_scalar_loss(loss)  # raises, naming the shape
        return loss
    return f


def primal(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The parameters' values, detached."""
    return {n: p.detach() for n, p in params.items()}


def forward_over_reverse(loss: FunctionalLoss, params: Mapping[str, Tensor], names: Sequence[str],
                         targets: Any, v: list[Tensor]) -> list[Tensor]:
    """``H v`` as ``torch.func.jvp`` of ``torch.func.grad`` of ``loss`` at ``params`` (in ``names`` order)."""
    f = grad(loss)
    tangent = dict(zip(names, v))
    y = targets
    try:
        with torch.no_grad():
            if y is not None and y.is_floating_point():
                # targets enter as primals with an explicit zero tangent: torch 2.13's forward
                # derivative of mse_loss_backward fails on the implicit (ZeroTensor) one
                hv = jvp(f, (primal(params), y), (tangent, torch.zeros_like(y)))[1]
            else:
                hv = jvp(lambda p: f(p, y), (primal(params),), (tangent,))[1]
    except (RuntimeError, NotImplementedError) as err:
        raise RuntimeError(
            f"method='forward_over_reverse' failed: an operation of this model or loss has no "
            f"working forward-mode derivative in this PyTorch ({err}); use method='reverse'"
        ) from err
    return [hv[n] for n in names]


def finite_difference(loss: FunctionalLoss, params: Mapping[str, Tensor], names: Sequence[str],
                      targets: Any, v: list[Tensor], fd_step: float | None,
                      dtype: torch.dtype) -> list[Tensor]:
    """``H v ≈ (∇L(θ + h v) − ∇L(θ − h v)) / (2h)``; ``fd_step`` is ``h``, None: ``ε_mach^{1/3}/‖v‖``."""
    fg = grad(loss)

    def f(p: dict[str, Tensor]) -> dict[str, Tensor]:
        result: dict[str, Tensor] = fg(p, targets)
        return result

    vnorm = float(torch.sqrt(sum(vi.pow(2).sum() for vi in v)))  # type: ignore[arg-type]
    if vnorm == 0.0:
        return [torch.zeros_like(p) for p in params.values()]
    h = fd_step if fd_step is not None else torch.finfo(dtype).eps ** (1 / 3) / vnorm
    theta = primal(params)
    with torch.no_grad():
        g_plus = f({n: t + h * vi for (n, t), vi in zip(theta.items(), v)})
        g_minus = f({n: t - h * vi for (n, t), vi in zip(theta.items(), v)})
    return [(g_plus[n] - g_minus[n]) / (2 * h) for n in names]
