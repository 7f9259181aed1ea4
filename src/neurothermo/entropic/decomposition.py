"""The entropic loss expected over minibatches and its force (docs/theory.md §1).

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
backward per chunk of data, never a loop of per-sample Hessian products. Per chunk, ONE forward and
one backward give the per-sample norms and the chunk's mean gradient together (the core of
``per_sample_grad_norms``, ``gradstats.norms.stats_of_batch``); the Hessian products and the
gradient of the norms are then double backwards through that one graph.

Everything is **exact** over ``data`` (no Monte-Carlo part, so no standard error): the data is
processed in chunks of ``chunk_size`` samples only to bound memory. ``Tr Σ`` is the difference
``(1/N)Σ‖g_i‖² − ‖ḡ‖²`` (both accumulated in float64); when ``Tr Σ ≪ ‖ḡ‖²`` its relative accuracy
is that of the model's dtype times ``‖ḡ‖²/Tr Σ``. For an estimate on a large
dataset pass a uniformly drawn subset as ``data``. The model must not hold BatchNorm layers in
train mode (they couple the samples of a batch, so per-sample losses are undefined): call
``model.eval()`` first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neurothermo._state import double_backward_attention, float32_copy, preserved_state, warn_mode
from neurothermo._types import LossFn, Mode
from neurothermo.entropic._common import batch_noise_factor, dot
from neurothermo.entropic.expected_force import ExpectedEntropicForce as ExpectedEntropicForce
from neurothermo.entropic.expected_force import (
    expected_entropic_force as expected_entropic_force,
)
from neurothermo.entropic.population import _mean_gradient, _prepare


@dataclass(frozen=True)
class EntropicDecomposition:
    """``E_B φ_lr = loss + discretization + noise`` at the current parameters (exact over data).

    Returned by :func:`entropic_decomposition`. All parts are exact (``exact = True``): there is
    no Monte-Carlo error to report.

    Attributes:
        loss: ``L + (wd/2)‖θ‖²``, ``L`` the mean loss over the N samples (torch ``wd``).
        discretization: ``(lr/4)·grad_norm_sq``.
        noise: ``(lr/4)·Tr Σ_B``.
        total: ``loss + discretization + noise``.
        trace_sigma: ``Tr Σ``, the population covariance of the per-sample gradients (divisor N).
        trace_sigma_batch: ``Tr Σ_B``, the covariance of a minibatch's mean gradient: ``Tr Σ/b``
            with replacement, ``(N − b)/(b(N − 1))·Tr Σ`` without.
        grad_norm_sq: ``‖∇L + wd·θ‖²``.
        lr: η.
        batch_size: b.
        replacement: whether minibatches are drawn with replacement.
        n_samples: N.
        exact: always True here.
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


def entropic_decomposition(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    lr: float,
    batch_size: int,
    replacement: bool = True,
    weight_decay: float = 0.0,
    chunk_size: int = 512,
    num_data: int | None = None,
    mode: Mode = None,
) -> EntropicDecomposition:
    """``E_B φ_lr = L + (lr/4)‖∇L‖² + (lr/4)·Tr Σ_B`` over minibatches of ``batch_size`` from ``data``.

    ``data`` is the whole population of N ≥ 2 samples, in the data model (``docs/data.md``): one
    batch ``(inputs, targets)`` (inputs a tensor or a dict of tensors), or an iterable of batches
    (a ``DataLoader``; sizes may differ, every sample weighs ``1/N``); ``loss_fn=model_loss`` when
    the model returns its loss. ``num_data``: N if known (checked against the samples read).
    Minibatches of ``batch_size`` are drawn uniformly, with or without replacement. Exact: one pass
    over ``data`` in chunks of at most ``chunk_size``. ``mode``: None (the model's current flags),
    "train" or "eval" for this call (BatchNorm must not be in train mode; active Dropout makes the
    result random, with a ``ModeWarning``). A float16/bfloat16 model is evaluated on a float32
    copy. The model is left exactly as it was.

    Args:
        model: the network; θ are its trainable parameters. Left unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: the whole population of N ≥ 2 samples, as described above.
        lr: the learning rate η (> 0).
        batch_size: the minibatch size b (≥ 1; ≤ N without replacement).
        replacement: draw minibatches with replacement (``Tr Σ_B = Tr Σ/b``) or without
            (``Tr Σ_B = (N − b)/(b(N − 1))·Tr Σ``).
        weight_decay: torch's ``wd`` (≥ 0): the penalty ``(wd/2)‖θ‖²``, the paper's ``γ = wd/2``
            (it adds to the gradient, not to Σ).
        chunk_size: at most this many samples per forward/backward pass (≥ 1).
        num_data: N if known (checked against the number of samples read); None to count.
        mode: None (the model's current flags), ``"train"`` or ``"eval"`` for this call.

    Returns:
        An :class:`EntropicDecomposition`: ``loss = L + (wd/2)‖θ‖²``, ``discretization =
        (lr/4)‖∇L + wd·θ‖²``, ``noise = (lr/4)·Tr Σ_B`` (Σ the population covariance of the
        per-sample gradients, divisor N) and ``total`` their sum, as floats.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``loss_fn`` not callable, non-number
            arguments, ``replacement`` not a bool, data of the wrong type.
        ValueError: fewer than 2 samples, ``batch_size`` > N without replacement, ``lr`` ≤ 0,
            ``weight_decay`` < 0, ``chunk_size`` < 1, ``num_data`` different from the samples
            read, BatchNorm in train mode, a loss that is not a scalar or not mean-reduced,
            data with NaN/Inf, a bad ``mode``.
        FloatingPointError: non-finite parameters or loss.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> dec = nt.entropic_decomposition(model, loss_fn, (x, y), lr=0.1, batch_size=8)
        >>> abs(dec.total - (dec.loss + dec.discretization + dec.noise)) < 1e-6
        True
        >>> dec.n_samples, dec.batch_size
        (32, 8)
    """
    with float32_copy(model) as m, preserved_state(m, mode), double_backward_attention():
        lr, wd, d, n, b, params = _prepare(m, loss_fn, data, lr, batch_size, replacement,
                                           weight_decay, chunk_size, num_data)
        warn_mode(m, None, "entropic_decomposition", stacklevel=4)
        leaves = list(params.values())
        loss, gbar, sq = _mean_gradient(m, loss_fn, d, n, params, chunk_size, norms=True)
    with torch.no_grad():
        theta = [p.detach() for p in leaves]
        g64 = [gi.to(torch.float64) for gi in gbar]
        gbar_sq = dot(g64, g64)  # Tr Σ = S − ‖ḡ‖² is a difference: both terms in float64
        full = [gi + wd * t for gi, t in zip(gbar, theta)] if wd else gbar
        grad_norm_sq = float(dot(full, full))
        penalty = 0.5 * wd * float(dot(theta, theta)) if wd else 0.0
    trace_sigma = float(sq - gbar_sq)
    trace_b = trace_sigma * batch_noise_factor(n, b, replacement)
    total_loss = float(loss) + penalty
    disc, noise = lr / 4 * grad_norm_sq, lr / 4 * trace_b
    return EntropicDecomposition(
        loss=total_loss, discretization=disc, noise=noise, total=total_loss + disc + noise,
        trace_sigma=trace_sigma, trace_sigma_batch=trace_b, grad_norm_sq=grad_norm_sq, lr=lr,
        batch_size=b, replacement=replacement, n_samples=n,
    )
