"""The entropic loss expected over minibatches and its force (THEORY.md §1).

    E_B φ_η = L + (η/4)‖∇L‖² + (η/4)·Tr Σ_B
              loss  discretization   noise

``L = (1/N) Σ_i l_i (+ (wd/2)‖θ‖²)`` over the ``N`` samples of ``data``;
``Tr Σ = (1/N) Σ_i ‖g_i‖² − ‖ḡ‖²`` (population convention, ``g_i = ∇l_i`` without decay: a
constant shift of every ``g_i`` leaves Σ unchanged); minibatches of ``b`` samples drawn uniformly
give ``Tr Σ_B = Tr Σ / b`` with replacement and ``Tr Σ·(N − b)/(b(N − 1))`` without (a full batch
has no noise). The expected entropic force is

    −(η/4)∇E_B‖g_B‖² = −(η/2)·H ∇L  −  (η/4)·∇Tr Σ_B,      ∇Tr Σ = (2/N) Σ_i H_i g_i − 2 H ḡ,

whose noise part comes from differentiating the per-sample squared gradient norms
(:func:`neurothermo.gradstats.per_sample_grad_norms` with ``create_graph=True``): one double
backward per chunk of data, never a loop of per-sample Hessian products.

Everything is **exact** over ``data`` (no Monte-Carlo part, so no standard error): the data is
processed in chunks of ``chunk_size`` samples only to bound memory. ``Tr Σ`` is the difference
``(1/N)Σ‖g_i‖² − ‖ḡ‖²`` (both accumulated in float64); when ``Tr Σ ≪ ‖ḡ‖²`` its relative accuracy
is that of the model's dtype times ``‖ḡ‖²/Tr Σ``. For an estimate on a large
dataset pass a uniformly drawn subset as ``data``. The model must not hold BatchNorm layers in
train mode (they couple the samples of a batch, so per-sample losses are undefined): call
``model.eval()`` first.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._state import has_train_mode_batchnorm, preserved_state
from neurothermo._validate import check_int
from neurothermo.entropic._common import (
    batch_noise_factor,
    batch_objective,
    check_common,
    check_data,
    dot,
    grads,
    hvp,
    model_parameters,
)
from neurothermo.gradstats import per_sample_grad_norms

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class EntropicDecomposition:
    """``E_B φ_lr = loss + discretization + noise`` at the current parameters (exact over data).

    ``loss = L + (wd/2)‖θ‖²``; ``grad_norm_sq = ‖∇L + wd·θ‖²``; ``discretization =
    (lr/4)·grad_norm_sq``; ``trace_sigma = Tr Σ`` (population, 1/N); ``trace_sigma_batch =
    Tr Σ_B``; ``noise = (lr/4)·Tr Σ_B``; ``total`` their sum with ``loss``. All parts are exact
    (``exact = True``): there is no Monte-Carlo error to report.
    """

    loss: float
    discretization: float
    noise: float
    total: float
    trace_sigma: float
    trace_sigma_batch: float
    grad_norm_sq: float
    lr: float
    batch_size: int
    replacement: bool
    n_samples: int
    exact: bool = True

    @property
    def temperature(self) -> float:
        """``lr / batch_size``, the temperature of the noise term."""
        return self.lr / self.batch_size


@dataclass(frozen=True, eq=False)
class ExpectedEntropicForce:
    """``−(lr/4)∇E_B‖g_B‖²`` split into ``discretization = −(lr/2)·H∇L`` and ``noise =
    −(lr/4)·∇Tr Σ_B``; ``total`` is their sum. Dicts by parameter name, exact over data."""

    discretization: dict[str, Tensor]
    noise: dict[str, Tensor]
    total: dict[str, Tensor]
    lr: float
    batch_size: int
    replacement: bool
    n_samples: int
    exact: bool = True


def _accumulate(acc: list[Tensor] | None, new: list[Tensor], w: float) -> list[Tensor]:
    """``acc + w·new`` in place (``w·new`` when ``acc`` is None)."""
    if acc is None:
        return new if w == 1.0 else [t.mul_(w) for t in new]
    for a, t in zip(acc, new):
        a.add_(t, alpha=w)
    return acc


def _chunks(x: Tensor, y: Tensor, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(0, x.shape[0], size):
        yield x[i:i + size], y[i:i + size]


def _prepare(model: nn.Module, loss_fn: LossFn, data: Any, lr: float, batch_size: int,
             replacement: bool, weight_decay: float,
             chunk_size: int) -> tuple[float, float, Tensor, Tensor, int, int, dict[str, Tensor]]:
    lr, wd = check_common(lr, weight_decay)
    x, y, n, b = check_data(data, batch_size, replacement)
    check_int("chunk_size", chunk_size, minimum=1)
    params = model_parameters(model)
    bn = has_train_mode_batchnorm(model)
    if bn is not None:
        raise ValueError(
            f"BatchNorm layer {bn!r} is in train mode: it couples the samples of a batch, so "
            "per-sample losses and the covariance Σ are undefined; call model.eval() first"
        )
    return lr, wd, x, y, n, b, params


def _sq_norms(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, *,
              create_graph: bool) -> Tensor:
    """``‖g_i‖²`` of each sample of the chunk (``[m]``), differentiable if ``create_graph``."""
    norms = per_sample_grad_norms(model, loss_fn, (x, y), create_graph=create_graph)
    assert isinstance(norms, Tensor)
    return norms


def _mean_gradient(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                   params: dict[str, Tensor], chunk_size: int,
                   *, norms: bool) -> tuple[Tensor, list[Tensor], Tensor]:
    """``L``, ``ḡ = ∇L`` and ``(1/N) Σ_i ‖g_i‖²`` (if ``norms``; accumulated in float64) exactly,
    chunk by chunk."""
    n = x.shape[0]
    leaves = list(params.values())
    loss = torch.zeros((), dtype=leaves[0].dtype, device=leaves[0].device)
    gbar = [torch.zeros_like(p) for p in leaves]
    sq = torch.zeros((), dtype=torch.float64, device=loss.device)
    for xs, ys in _chunks(x, y, chunk_size):
        w = xs.shape[0] / n
        value = batch_objective(model, loss_fn, (xs, ys), name="data")(params)
        for acc, gi in zip(gbar, grads(value, leaves)):
            acc.add_(gi, alpha=w)
        loss = loss + w * value.detach()
        if norms:
            chunk_sq = _sq_norms(model, loss_fn, xs, ys, create_graph=False).detach()
            sq = sq + chunk_sq.to(torch.float64).sum() / n
    return loss, gbar, sq


def entropic_decomposition(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[Tensor, Tensor],
    *,
    lr: float,
    batch_size: int,
    replacement: bool = True,
    weight_decay: float = 0.0,
    chunk_size: int = 512,
) -> EntropicDecomposition:
    """``E_B φ_lr = L + (lr/4)‖∇L‖² + (lr/4)·Tr Σ_B`` over minibatches of ``batch_size`` from ``data``.

    ``data = (inputs, targets)`` is the whole population (N ≥ 2 samples); minibatches are drawn
    uniformly, with or without replacement. Exact: one pass over ``data`` in chunks of
    ``chunk_size``. The model is left exactly as it was.
    """
    lr, wd, x, y, n, b, params = _prepare(model, loss_fn, data, lr, batch_size, replacement,
                                          weight_decay, chunk_size)
    leaves = list(params.values())
    with preserved_state(model):
        loss, gbar, sq = _mean_gradient(model, loss_fn, x, y, params, chunk_size, norms=True)
    with torch.no_grad():
        theta = [p.detach() for p in leaves]
        g64 = [gi.to(torch.float64) for gi in gbar]
        gbar_sq = dot(g64, g64)  # Tr Σ = S − ‖ḡ‖² is a difference: both terms in float64
        full = [gi + wd * t for gi, t in zip(gbar, theta)]
        grad_norm_sq = float(dot(full, full))
        penalty = 0.5 * wd * float(dot(theta, theta))
    trace_sigma = float(sq - gbar_sq)
    trace_b = trace_sigma * batch_noise_factor(n, b, replacement)
    total_loss = float(loss) + penalty
    disc, noise = lr / 4 * grad_norm_sq, lr / 4 * trace_b
    return EntropicDecomposition(
        loss=total_loss, discretization=disc, noise=noise, total=total_loss + disc + noise,
        trace_sigma=trace_sigma, trace_sigma_batch=trace_b, grad_norm_sq=grad_norm_sq, lr=lr,
        batch_size=b, replacement=replacement, n_samples=n,
    )


def expected_entropic_force(
    model: nn.Module,
    loss_fn: LossFn,
    data: tuple[Tensor, Tensor],
    *,
    lr: float,
    batch_size: int,
    replacement: bool = True,
    weight_decay: float = 0.0,
    chunk_size: int = 512,
) -> ExpectedEntropicForce:
    """``−(lr/4)∇E_B‖g_B‖²`` by parameter name: ``discretization = −(lr/2)(H + wd)(∇L + wd·θ)``
    and ``noise = −(lr/4)·(Tr Σ_B/Tr Σ)·∇Tr Σ`` with ``∇Tr Σ = ∇[(1/N)Σ_i‖g_i‖²] − 2Hḡ``.

    The first term of ``∇Tr Σ`` is one double backward through the per-sample squared gradient
    norms of each chunk; the Hessian products are double backwards of ``⟨g, v⟩``. When ``data``
    fits in one chunk the mean gradient comes from the same graph, else from a first pass.
    Exact over ``data``; the model is left exactly as it was.
    """
    lr, wd, x, y, n, b, params = _prepare(model, loss_fn, data, lr, batch_size, replacement,
                                          weight_decay, chunk_size)
    names, leaves = list(params), list(params.values())
    factor = batch_noise_factor(n, b, replacement)
    h_gbar: list[Tensor] | None = None  # H ḡ
    h_v: list[Tensor] | None = None  # H (ḡ + wd·θ), only with weight decay
    d_sq: list[Tensor] | None = None  # ∇ (1/N) Σ_i ‖g_i‖²
    with preserved_state(model):
        gbar: list[Tensor] | None = None
        if n > chunk_size:
            gbar = _mean_gradient(model, loss_fn, x, y, params, chunk_size, norms=False)[1]
        for xs, ys in _chunks(x, y, chunk_size):
            w = xs.shape[0] / n
            value = batch_objective(model, loss_fn, (xs, ys), name="data")(params)
            g = grads(value, leaves, create_graph=True)
            if gbar is None:  # one chunk: ḡ is this chunk's gradient
                gbar = [gi.detach() for gi in g]
            h_gbar = _accumulate(h_gbar, hvp(g, leaves, gbar, retain_graph=bool(wd)), w)
            if wd:
                v = [gi + wd * p.detach() for gi, p in zip(gbar, leaves)]
                h_v = _accumulate(h_v, hvp(g, leaves, v), w)
            norms = _sq_norms(model, loss_fn, xs, ys, create_graph=True)
            d_sq = _accumulate(d_sq, grads(norms.sum(), leaves), 1.0 / n)
    assert gbar is not None and h_gbar is not None and d_sq is not None
    disc, noise, total = {}, {}, {}
    for i, nm in enumerate(names):
        if h_v is None:
            disc[nm] = h_gbar[i] * (-0.5 * lr)
        else:  # −(lr/2)(H + wd·I)(ḡ + wd·θ)
            vi = gbar[i] + wd * leaves[i].detach()
            disc[nm] = (h_v[i] + wd * vi).mul_(-0.5 * lr)
        noise[nm] = torch.add(d_sq[i], h_gbar[i], alpha=-2.0).mul_(-0.25 * lr * factor)
        total[nm] = disc[nm] + noise[nm]
    return ExpectedEntropicForce(discretization=disc, noise=noise, total=total, lr=lr,
                                 batch_size=b, replacement=replacement, n_samples=n)
