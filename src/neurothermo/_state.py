"""Model state helpers: parameter selection and restoring a model exactly as it was.

Measurements (entropic terms, Hessian products, per-sample norms) run extra forward passes. They
must never change training: BatchNorm running statistics, the train/eval flags and parameter
``.grad`` fields are restored exactly on exit, also when the measurement raises.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

ParamFilter = Callable[[str, Tensor], bool] | list[str] | tuple[str, ...] | str | None


def select_parameters(model: nn.Module, param_filter: ParamFilter = None) -> dict[str, Tensor]:
    """Trainable parameters of ``model`` (``requires_grad``) by name, optionally filtered.

    ``param_filter`` is ``None`` (all), a name prefix string, a list of names / prefixes, or a
    predicate ``(name, tensor) -> bool``. Raises if nothing matches.
    """
    params: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if param_filter is None:
        chosen = params
    elif callable(param_filter):
        chosen = {n: p for n, p in params.items() if param_filter(n, p)}
    else:
        keys = [param_filter] if isinstance(param_filter, str) else list(param_filter)
        chosen = {
            n: p for n, p in params.items()
            if any(n == k or n.startswith(k + ".") for k in keys)
        }
    if not chosen:
        raise ValueError(
            f"no trainable parameters match param_filter={param_filter!r}; "
            f"available: {sorted(params)[:20]}"
        )
    return chosen


def _buffers_of_stateful_modules(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_buffers())


@contextmanager
def preserved_state(model: nn.Module, mode: str | None = None) -> Iterator[nn.Module]:
    """Run a block on ``model`` and restore buffers, train/eval flags and ``.grad`` afterwards.

    Within the block the parameters have no ``.grad`` (the caller's are set aside and put back).

    ``mode`` is ``"train"``, ``"eval"`` or ``None`` (keep the current mode) for the block.
    """
    if mode not in (None, "train", "eval"):
        raise ValueError(f"mode must be 'train', 'eval' or None, got {mode!r}")
    flags = {m: m.training for m in model.modules()}
    buffers = {n: b.detach().clone() for n, b in _buffers_of_stateful_modules(model).items()}
    # The caller's gradients are set aside, not copied: inside the block every ``.grad`` is None,
    # so a backward there writes fresh tensors and cannot accumulate into the caller's (a copy of
    # every gradient per call cost more than some of the blocks it protects).
    grads = {n: p.grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    if mode is not None:
        model.train(mode == "train")
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for n, b in _buffers_of_stateful_modules(model).items():
                # Copy back only what changed: an in-place copy bumps the buffer's version counter,
                # which breaks a later backward through a graph that saved it (eval-mode BatchNorm
                # saves its running statistics; create_graph=True results outlive this block).
                if n in buffers and not torch.equal(b, buffers[n]):
                    b.copy_(buffers[n])
        for n, p in model.named_parameters():
            p.grad = grads.get(n)


def has_train_mode_batchnorm(model: nn.Module) -> str | None:
    """Name of the first BatchNorm module in train mode, or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return name or type(m).__name__
    return None
