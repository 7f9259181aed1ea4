"""Independent references shared by the gradstats tests: per-sample gradients by a loop of b
separate backward passes (``l_i`` = the loss on the batch ``{i}``), float64 throughout."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

DT = torch.float64
RTOL = 1e-10  # float64, exact formulas on both sides: only rounding (~1e-16 per operation) differs
LossFn = Callable[[Tensor, Tensor], Tensor]


def per_sample_grads(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``{name: [N, numel]}`` of ``g_i = ∇ l_i`` for the parameters that require a gradient, one
    backward per sample; zeros for a parameter that does not reach the loss."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), list(named.values()),
                                allow_unused=True)
        rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, named.values())])
    return {n: torch.stack([r[j].flatten() for r in rows]) for j, n in enumerate(named)}


def naive_sq_norms(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``‖∇_θ l_i‖²`` per parameter (``{name: [N]}``), from :func:`per_sample_grads`."""
    return {n: g.square().sum(1) for n, g in per_sample_grads(model, loss_fn, x, y).items()}


def naive_total_sq_norms(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    """``‖∇ l_i‖²`` over all parameters that require a gradient, ``[N]``."""
    return torch.stack(list(naive_sq_norms(model, loss_fn, x, y).values())).sum(0)


def assert_matches_naive(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> None:
    """``per_sample_grad_norms`` (by parameter and in total) equals the loop to ``RTOL``; the
    absolute floor is ``RTOL·1e-3`` of the largest per-sample total, for norms that cancel to ~0."""
    from neurothermo.gradstats import per_sample_grad_norms

    ref = naive_sq_norms(model, loss_fn, x, y)
    got = per_sample_grad_norms(model, loss_fn, (x, y), by_parameter=True)
    assert isinstance(got, dict)
    assert list(got) == list(ref)
    scale = float(torch.stack(list(ref.values())).sum(0).max())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=RTOL, atol=RTOL * 1e-3 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")
    total = per_sample_grad_norms(model, loss_fn, (x, y))
    assert isinstance(total, Tensor) and total.shape == (x.shape[0],)
    torch.testing.assert_close(total, torch.stack(list(ref.values())).sum(0), rtol=RTOL, atol=0)
