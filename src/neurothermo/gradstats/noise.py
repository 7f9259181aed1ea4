"""Gradient noise ``Tr Σ`` from per-sample gradient norms, with its standard error (docs/theory.md §1).

Notation: per-sample gradients ``g_i = ∇_θ l_i``; batch ``B_k`` of ``b_k`` samples with mean
``ḡ_k = ∇_θ l_{B_k}``; ``N`` samples in all with mean ``ḡ = (1/N) Σ_i g_i``.

Estimator (``trace_sigma``). Per batch, the unbiased sample covariance trace

    T_k = (b_k / (b_k − 1)) · [ (1/b_k) Σ_{i∈B_k} ‖g_i‖²  −  ‖ḡ_k‖² ]
        = (1/(b_k − 1)) Σ_{i∈B_k} ‖g_i − ḡ_k‖²,

pooled over the K batches with weights ``b_k − 1`` (the pooled within-batch covariance; a plain
mean when all batches have one size). Divisor convention: ``b_k − 1``, so ``E T_k = Tr Σ`` for the
covariance ``Σ = Cov[g(x)]`` of the distribution the samples are drawn from (i.i.d.), and
``E T_k = N_pop/(N_pop − 1) · Tr Σ_pop`` for batches drawn without replacement from a finite set
of ``N_pop`` samples whose covariance is taken with divisor ``N_pop`` (the convention of docs/theory.md).
Standard error: the spread of the ``T_k`` across batches,
``se² = K/(K−1) · Σ_k w_k² (T_k − T̄)² / (Σ_k w_k)²`` (``= s²_T/K`` for equal sizes); ``inf`` with
a single batch (no spread to estimate it from).

``trace_sigma_population`` is the definition of docs/theory.md with the N given samples as the population:
``(1/N) Σ_i ‖g_i‖² − ‖ḡ‖²`` (divisor N; exact for these samples, biased low by ``(N−1)/N`` as an
estimate of a larger population's ``Tr Σ``). ``grad_norm_sq = ‖ḡ‖²`` (for i.i.d. samples
``E‖ḡ‖² = ‖∇L‖² + Tr Σ / N``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Batch, Data, as_data, check_num_data
from neurothermo._state import preserved_state, warn_mode
from neurothermo._types import LossFn
from neurothermo._validate import check_int
from neurothermo.gradstats.norms import check_finite_norms, prepare, stats_of_batch


@dataclass(frozen=True)
class GradientNoise:
    """Gradient-noise statistics of a model on N samples (see the module docstring for formulas).

    Attributes:
        trace_sigma: unbiased estimate of ``Tr Σ`` (pooled per-batch estimator, divisor b−1).
        trace_sigma_se: its standard error from the spread across batches (inf if one batch).
        mean_grad_sq_norm: ``(1/N) Σ_i ‖g_i‖²`` (per-sample gradients, not divided by b).
        mean_grad_sq_norm_se: ``sd_i(‖g_i‖²) / √N``.
        grad_norm_sq: ``‖ḡ‖²``, ``ḡ`` the mean gradient over all N samples.
        trace_sigma_population: ``mean_grad_sq_norm − grad_norm_sq`` (divisor N, docs/theory.md §1).
        n_samples, n_batches, batch_size: N, K and the smallest batch size used.
        per_parameter: ``{name: GradientNoise}`` for each parameter alone (trace, mean and
            ‖ḡ‖² add up over parameters; standard errors do not), or None.
    """

    trace_sigma: float
    trace_sigma_se: float
    mean_grad_sq_norm: float
    mean_grad_sq_norm_se: float
    grad_norm_sq: float
    trace_sigma_population: float
    n_samples: int
    n_batches: int
    batch_size: int
    per_parameter: Mapping[str, GradientNoise] | None = None


def gradient_noise(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    batch_size: int | None = None,
    by_parameter: bool = False,
    num_data: int | None = None,
) -> GradientNoise:
    """Estimate ``Tr Σ`` (and ‖g_i‖², ‖ḡ‖²) from all samples of ``data``, one backward per batch.

    ``data = (x, y)`` holds N samples (sample axis first). They are split *in order* into
    ``K = ⌊N / batch_size⌋`` consecutive batches of near-equal size (``batch_size`` or a little
    more, so every sample is used); shuffle ``data`` first if its order is not random. Each batch
    costs one forward and one backward (:func:`per_sample_grad_norms` plus the batch gradient).
    ``loss_fn`` is mean-reduced (docs/theory.md conventions); ``g_i = ∇_θ l_i`` is NOT divided by b.

    ``trace_sigma`` = Σ_k (b_k−1)·T_k / Σ_k (b_k−1) with, per batch,
    ``T_k = (b_k/(b_k−1))·[(1/b_k) Σ_{i∈B_k} ‖g_i‖² − ‖ḡ_k‖²]`` (divisor b−1: unbiased for
    ``Tr Cov[g(x)]`` of i.i.d. samples; for batches drawn without replacement from a finite set of
    ``N_pop`` it estimates ``N_pop/(N_pop−1)`` times docs/theory.md's divisor-N ``Tr Σ``), with standard
    error from the spread of the T_k (inf for K = 1). ``trace_sigma_population`` is docs/theory.md's
    ``(1/N) Σ_i ‖g_i‖² − ‖ḡ‖²`` over the N samples (divisor N). Details: the module docstring.
    ``by_parameter`` adds ``per_parameter``, the same statistics for each parameter alone.

    Data (``docs/data.md``): one batch ``(inputs, targets)`` (inputs a tensor or a dict of
    tensors; ``loss_fn=model_loss`` for a model returning its own loss), split as above; or an
    iterable of batches (a ``DataLoader``): each batch is one ``B_k`` (``batch_size=None``), or is
    split as above into batches of ``batch_size``; batches of unequal size are pooled with weights
    ``b_k − 1`` as in the formula. ``num_data``: N if known (checked against the samples read).

    Args:
        model: the network; θ are its trainable parameters. Left unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: one batch (N ≥ 2 samples) or an iterable of batches, as described above.
        batch_size: the size b of the batches ``B_k`` (≥ 2); required for one batch, None to
            take an iterable's batches as they are.
        by_parameter: also return the statistics of each parameter alone (``per_parameter``).
        num_data: N if known (checked against the samples read); None to count.

    Returns:
        A :class:`GradientNoise` with ``trace_sigma`` and its standard error, ``mean_grad_sq_norm``
        (``(1/N) Σ_i ‖g_i‖²``), ``grad_norm_sq`` (``‖ḡ‖²``), ``trace_sigma_population`` and the
        counts N, K and b.

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``loss_fn`` not callable, a non-int
            ``batch_size``, data of the wrong type.
        ValueError: one batch without ``batch_size``, ``batch_size`` < 2, fewer than 2 samples,
            ``num_data`` different from the samples read, BatchNorm normalising with batch
            statistics (train mode: use ``model.eval()``), a loss that is not a mean-reduced
            scalar, data with NaN/Inf, activations that are not batch-first.
        FloatingPointError: non-finite parameters, loss or norms.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> noise = nt.gradient_noise(model, loss_fn, (x, y), batch_size=8)
        >>> noise.n_samples, noise.n_batches
        (32, 4)
        >>> bool(noise.trace_sigma > 0) and bool(noise.trace_sigma_se > 0)
        True
    """
    warn_mode(model, None, "gradient_noise", batchnorm=False)
    params = prepare(model, loss_fn)
    d = as_data(data, loss_fn, name="data", model=model, min_size=2)
    if d.single is not None and batch_size is None:
        raise ValueError("batch_size is required when data is one batch (it is split into "
                         "batches of batch_size); pass batch_size, or an iterable of batches")
    if batch_size is not None:
        check_int("batch_size", batch_size, minimum=2)
    rows_s, rows_g, sizes = [], [], []
    gsum: dict[str, Tensor] = {}
    names = list(params)
    with preserved_state(model):
        for i, part in enumerate(_pieces(d, batch_size)):
            st = stats_of_batch(model, loss_fn, part, params, mean_grad=True,
                                check_finite=False, probe_reduction=i == 0)
            assert st.mean_grad is not None
            b = part.size
            sizes.append(b)
            rows_s.append(torch.stack([st.sq_norms[m].double() for m in names]))  # [P, b]
            rows_g.append(torch.stack([st.mean_grad[m].double().square().sum() for m in names]))
            for m in names:
                g = st.mean_grad[m].detach().double() * b
                gsum[m] = g if m not in gsum else gsum[m] + g
    n, k = check_num_data(num_data, sum(sizes)), len(sizes)
    check_finite_norms(model, rows_s)
    sq = torch.cat(rows_s, 1)  # [P, N]: ‖g_i‖² per parameter
    gk = torch.stack(rows_g, 1)  # [P, K]: ‖ḡ_k‖²
    size = torch.tensor(sizes, dtype=torch.float64, device=sq.device)
    sk = torch.stack([r.sum(1) for r in rows_s], 1)  # [P, K]: Σ_{i∈B_k} ‖g_i‖²
    tk = size / (size - 1) * (sk / size - gk)  # [P, K]
    gbar_sq = torch.stack([(gsum[m] / n).square().sum() for m in names])  # [P]
    per = _summaries(sq, tk, gbar_sq, size)
    tot = _summaries(sq.sum(0, keepdim=True), tk.sum(0, keepdim=True),
                     gbar_sq.sum().reshape(1), size)[0]
    shape = (n, k, min(sizes))
    breakdown = None
    if by_parameter:
        breakdown = MappingProxyType({m: GradientNoise(*p, *shape) for m, p in zip(names, per)})
    return GradientNoise(*tot, *shape, per_parameter=breakdown)


def _pieces(data: Data, batch_size: int | None) -> Iterator[Batch]:
    """The batches ``B_k``: every batch of ``data`` as it is (``batch_size=None``) or split in order
    into ``⌊b/batch_size⌋`` consecutive pieces of near-equal size."""
    for i, batch in enumerate(data):
        if batch_size is None:
            if batch.size < 2:
                raise ValueError(f"data[{i}] has {batch.size} sample; every batch needs at least 2 "
                                 "to estimate a covariance")
            yield batch
            continue
        if batch_size > batch.size:
            raise ValueError(f"batch_size must be >= 2 and <= {batch.size} (the samples in "
                             f"{'data' if data.single is not None else f'data[{i}]'}), got {batch_size}")
        yield from batch.tensor_split(batch.size // batch_size)


def _summaries(sq: Tensor, tk: Tensor, gbar_sq: Tensor, size: Tensor
               ) -> list[tuple[float, float, float, float, float, float]]:
    """Rows of ``sq`` [R, N], ``tk`` [R, K], ``gbar_sq`` [R] → the first six fields of
    :class:`GradientNoise` (trace, its se, mean ‖g_i‖², its se, ‖ḡ‖², population trace)."""
    n, k = sq.shape[1], tk.shape[1]
    w = size - 1
    trace = (tk * w).sum(1) / w.sum()
    if k > 1:
        se = ((k / (k - 1)) * ((w * (tk - trace[:, None])).square().sum(1)) / w.sum() ** 2).sqrt()
    else:
        se = torch.full_like(trace, math.inf)
    mean = sq.mean(1)
    mean_se = sq.std(1) / math.sqrt(n)
    pop = mean - gbar_sq
    return list(zip(trace.tolist(), se.tolist(), mean.tolist(), mean_se.tolist(),
                    gbar_sq.tolist(), pop.tolist()))
