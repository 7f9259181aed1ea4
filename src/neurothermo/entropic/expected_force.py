"""The expected entropic force ``−(lr/4)∇E_B‖g_B‖²`` over minibatches, split into its
discretization and noise parts, exact over the data (docs/theory.md §1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import Data
from neurothermo._state import (
    double_backward_attention,
    float32_copy,
    frozen_rows,
    preserved_state,
    warn_mode,
    zero_frozen_rows,
)
from neurothermo._types import LossFn, Mode
from neurothermo.curvature.hvp import double_backward_hvp as hvp  # the one HVP kernel
from neurothermo.entropic._common import batch_noise_factor, grads
from neurothermo.entropic.population import _chunk_stats, _mean_gradient, _prepare


@dataclass(frozen=True, eq=False)
class ExpectedEntropicForce:
    """``−(lr/4)∇E_B‖g_B‖²`` split into its discretization and noise parts, exact over data.

    Returned by :func:`expected_entropic_force`.

    Attributes:
        discretization: ``{name: −(lr/2)·(H + wd)(∇L + wd·θ)}``.
        noise: ``{name: −(lr/4)·∇Tr Σ_B}``.
        total: ``{name: discretization + noise}``.
        lr: η.
        batch_size: b.
        replacement: whether minibatches are drawn with replacement.
        n_samples: N.
        exact: always True here.
    """

    discretization: dict[str, Tensor]
    noise: dict[str, Tensor]
    total: dict[str, Tensor]
    lr: float
    batch_size: int
    replacement: bool
    n_samples: int
    exact: bool = True


Scaled = tuple[list[Tensor], float]  # (ts, s) stands for s·ts: scaling is deferred to the end


def _accumulate(acc: Scaled | None, new: list[Tensor], w: float, keep: list[Tensor]) -> Scaled:
    """``acc + w·new``, in place in the first ``new`` (kept unscaled: the scale is carried along so
    that no pass over the tensors is spent on it). ``keep``: tensors that must not be written."""
    if acc is None:
        return _owned(new, keep), w
    ts, s = acc
    for a, t in zip(ts, new):
        a.add_(t, alpha=w / s)
    return acc


def _owned(ts: list[Tensor], keep: list[Tensor]) -> list[Tensor]:
    """``ts`` made safe to overwrite in place. Results of ``torch.autograd.grad`` own their
    memory (often as views of a fresh buffer) except in corner cases: an expanded tensor, or a
    ``grad_outputs`` or saved tensor passed straight through. Entries that are not contiguous
    (an expanded tensor is not) or share storage with ``keep`` or an earlier entry are copied."""
    seen = {t.untyped_storage().data_ptr() for t in keep}
    out = []
    for t in ts:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out.append(t)
    return out


def expected_entropic_force(
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
) -> ExpectedEntropicForce:
    """``−(lr/4)∇E_B‖g_B‖²`` by parameter name: ``discretization = −(lr/2)(H + wd)(∇L + wd·θ)``
    and ``noise = −(lr/4)·(Tr Σ_B/Tr Σ)·∇Tr Σ`` with ``∇Tr Σ = ∇[(1/N)Σ_i‖g_i‖²] − 2Hḡ``.

    Per chunk: one forward + backward (with graph) gives the per-sample squared gradient norms
    and the chunk's mean gradient ``g``; the first term of ``∇Tr Σ`` is one double backward of the
    summed norms, the Hessian products are double backwards of ``⟨g, v⟩`` through the same graph.
    When ``data`` fits in one chunk ``ḡ`` is that chunk's ``g``, else it comes from a first pass.
    ``data``, ``loss_fn`` and ``num_data`` as in :func:`entropic_decomposition` (an iterable of
    batches is read twice when it holds more than one chunk). Exact over ``data``. ``mode`` and
    precision as for :func:`entropic_decomposition`; attention runs in a twice-differentiable
    kernel. The model is left exactly as it was.

    Args:
        model: the network; θ are its trainable parameters. Left unchanged.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch (``l_B = (1/b) Σ_i
            l_i``), or ``model_loss`` / None when the model returns its own mean loss.
        data: the whole population of N ≥ 2 samples, as in :func:`entropic_decomposition`.
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
        An :class:`ExpectedEntropicForce`: dicts name -> tensor ``discretization``, ``noise`` and
        ``total`` (detached, the parameters' shapes).

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
        >>> ef = nt.expected_entropic_force(model, loss_fn, (x, y), lr=0.1, batch_size=8)
        >>> sorted(ef.total) == sorted(n for n, _ in model.named_parameters())
        True
    """
    with float32_copy(model) as m, preserved_state(m, mode), double_backward_attention():
        lr, wd, d, n, b, params = _prepare(m, loss_fn, data, lr, batch_size, replacement,
                                           weight_decay, chunk_size, num_data)
        warn_mode(m, None, "expected_entropic_force", stacklevel=4)
        res = _expected_force(m, loss_fn, lr, wd, d, n, b, params, replacement, chunk_size)
        for part in (res.discretization, res.noise, res.total):  # padding rows never train
            zero_frozen_rows(part, frozen_rows(m))
        return res


def _expected_force(model: nn.Module, loss_fn: LossFn, lr: float, wd: float, d: Data,
                    n: int, b: int, params: dict[str, Tensor], replacement: bool,
                    chunk_size: int) -> ExpectedEntropicForce:
    names, leaves = list(params), list(params.values())
    factor = batch_noise_factor(n, b, replacement)
    h_gbar: Scaled | None = None  # H ḡ
    h_v: Scaled | None = None  # H (ḡ + wd·θ), only with weight decay
    d_sq: Scaled | None = None  # ∇ (1/N) Σ_i ‖g_i‖²
    gbar: list[Tensor] | None = None
    if d.single is None or n > chunk_size:
        gbar = _mean_gradient(model, loss_fn, d, n, params, chunk_size, norms=False)[1]
    for chunk in d.chunks(chunk_size):
        w = chunk.size / n
        g, sq_sum = _chunk_stats(model, loss_fn, chunk, params, create_graph=True)[1:]
        if gbar is None:  # one chunk: ḡ is this chunk's gradient
            gbar = [gi.detach() for gi in g]
        keep = [*gbar, *leaves, *chunk.tensors()]  # accumulators must not share memory with these
        h_gbar = _accumulate(h_gbar, hvp(g, leaves, gbar, retain_graph=True), w, keep)
        keep += h_gbar[0]
        if wd:
            v = [gi + wd * p.detach() for gi, p in zip(gbar, leaves)]
            h_v = _accumulate(h_v, hvp(g, leaves, v, retain_graph=True), w, keep + v)
            keep += h_v[0]
        del g  # the last double backward frees the graph
        d_sq = _accumulate(d_sq, grads(sq_sum, leaves), 1.0 / n, keep)
        del sq_sum
    assert gbar is not None and h_gbar is not None and d_sq is not None
    (hg, s_hg), (dq, s_dq) = h_gbar, d_sq
    c_noise = -0.25 * lr * factor
    disc, noise, total = {}, {}, {}
    for i, nm in enumerate(names):  # written in place into the accumulators: one new tensor each
        # −(lr/4)·f·(∇(1/N)Σ‖g_i‖² − 2Hḡ)
        noise[nm] = dq[i].mul_(c_noise * s_dq).add_(hg[i], alpha=-2.0 * c_noise * s_hg)
        if h_v is None:
            disc[nm] = hg[i].mul_(-0.5 * lr * s_hg)
        else:  # −(lr/2)(H + wd·I)(ḡ + wd·θ)
            hv, s_hv = h_v
            disc[nm] = (hv[i].mul_(s_hv).add_(gbar[i], alpha=wd)
                        .add_(leaves[i].detach(), alpha=wd * wd).mul_(-0.5 * lr))
        total[nm] = disc[nm] + noise[nm]
    return ExpectedEntropicForce(discretization=disc, noise=noise, total=total, lr=lr,
                                 batch_size=b, replacement=replacement, n_samples=n)
