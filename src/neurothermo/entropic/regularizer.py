"""Explicit entropic regularisation: add SGD's implicit term to a loss (docs/theory.md §1).

Small-batch SGD with learning rate η follows, to first order, the modified loss
``L + (η/4)·E_B‖g_B‖² = L + (η/4)(‖∇L‖² + Tr Σ_B)`` (Smith et al. 2021). A model trained with large
batches (or full batch) can be given the small-batch term explicitly (Geiping et al. 2022):

    R(θ) = (η/4)·(1/K) Σ_k ‖∇l_{B_k}(θ) + wd·θ‖²,

the mean over the ``K`` micro-batches of ``batch_size`` samples the batch splits into. Its
gradient is exactly ``(η/2)·(1/K) Σ_k H_k g_k`` (``(η/2)·H·g`` for one micro-batch), with
``H_k`` and ``g_k`` including the decay. In expectation over a batch of ``B`` samples drawn
uniformly, ``R`` is ``(η/4)(‖∇L‖² + Tr Σ_b)``: the large-batch step's own implicit term
``(η/4)‖g_B‖²`` comes on top, as in Geiping et al.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import as_batch
from neurothermo._state import double_backward_attention, preserved_state, warn_mode
from neurothermo._validate import check_int
from neurothermo.entropic._common import (
    batch_objective,
    check_common,
    dot,
    grads,
    model_parameters,
)


@dataclass(frozen=True)
class EntropicRegularizer:
    """``R = (lr/4)·mean_k ‖∇l_{B_k} + wd·θ‖²`` over micro-batches of ``batch_size`` samples.

    ``reg(model, loss_fn, batch)`` returns ``R`` as a differentiable scalar tensor; add it to the
    loss you train on: ``loss = loss_fn(model(x), y) + reg(model, loss_fn, (x, y))``. ``batch`` is
    one batch of the data model (``docs/data.md``: inputs a tensor or a dict of tensors;
    ``loss_fn=model_loss`` when the model returns its loss).
    ``batch_size=None`` uses the whole batch as one micro-batch; otherwise the batch size must
    be a multiple of it. The extra forward passes leave BatchNorm running statistics and
    ``.grad`` untouched (your own forward pass updates them as usual). They run in the model's
    current mode (a training term); active Dropout makes ``R`` random (a ``ModeWarning`` says so).
    Attention runs in a twice-differentiable kernel, so ``R.backward()`` works through
    ``scaled_dot_product_attention``. The instance is a frozen, callable record of its settings.

    Args:
        lr: the learning rate η (> 0).
        batch_size: the micro-batch size (≥ 1), or None for the whole batch as one.
        weight_decay: torch's ``wd`` (≥ 0): ``g = ∇l_B + wd·θ`` is the gradient of ``l_B +
            (wd/2)‖θ‖²`` (the paper's ``γ = wd/2``).

    Raises:
        TypeError: a non-number ``lr`` or ``weight_decay``, a non-int ``batch_size``; when
            called, ``model`` not an ``nn.Module``, ``loss_fn`` not callable, a batch of the
            wrong type.
        ValueError: ``lr`` ≤ 0, ``weight_decay`` < 0, ``batch_size`` < 1; when called, a batch
            whose size is not a multiple of ``batch_size``, a loss that is not a mean-reduced
            scalar, a batch with NaN/Inf.
        FloatingPointError: (when called) non-finite parameters or loss.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> reg = nt.EntropicRegularizer(lr=0.1)
        >>> loss = loss_fn(model(x), y)
        >>> total = loss + reg(model, loss_fn, (x, y))  # R = (lr/4)‖∇l_B‖², differentiable
        >>> g = torch.autograd.grad(loss, list(model.parameters()))
        >>> torch.allclose(total, loss + 0.1 / 4 * sum((t ** 2).sum() for t in g))
        True
    """

    lr: float
    batch_size: int | None = None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_common(self.lr, self.weight_decay)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)

    def __call__(self, model: nn.Module, loss_fn: Callable[..., Tensor] | None,
                 batch: Any) -> Tensor:
        params = model_parameters(model)
        whole = as_batch(batch, loss_fn, device=next(iter(params.values())).device)
        total = whole.size
        b = total if self.batch_size is None else self.batch_size
        if total % b:
            raise ValueError(
                f"batch of {total} samples does not split into micro-batches of batch_size={b}; "
                "use a batch size that is a multiple of it (e.g. DataLoader(drop_last=True))"
            )
        leaves = list(params.values())
        terms = []
        warn_mode(model, None, "EntropicRegularizer", batchnorm=False)
        # the math attention kernel: R is differentiated once more by the caller's backward
        with preserved_state(model), double_backward_attention():
            for part in whole.split(b):
                objective = batch_objective(model, loss_fn, part, weight_decay=self.weight_decay)
                g = grads(objective(params), leaves, create_graph=True)
                terms.append(dot(g, g))
        return self.lr / 4 * torch.stack(terms).mean()
