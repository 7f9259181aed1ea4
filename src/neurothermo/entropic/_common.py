"""Shared plumbing of the entropic engine: parameter structures, the batch objective, checks.

Conventions (docs/theory.md): ``loss_fn(outputs, targets)`` is the mean over the batch,
``l_B = (1/b) Σ_i l_i``; ``weight_decay`` is torch's ``wd``, entering as the penalty
``(wd/2)‖θ‖²`` added to ``l_B`` (so the gradient is ``g_B + wd·θ``), on every trainable parameter.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from neurothermo._data import Data, as_data, check_num_data
from neurothermo._state import select_parameters
from neurothermo._validate import (
    check_finite_params,
    check_int,
    check_loss_fn,
    check_positive,
)

Params = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
Objective = Callable[[Any], Tensor]


def flatten(params: Params) -> tuple[list[Tensor], Callable[[list[Tensor]], Any], list[str] | None]:
    """``params`` as a list of tensors, a function rebuilding the same structure, and the names."""
    if isinstance(params, Tensor):
        return [params], lambda ts: ts[0], None
    if isinstance(params, Mapping):
        names = list(params)
        for n in names:
            if not isinstance(params[n], Tensor):
                raise TypeError(f"params[{n!r}] must be a Tensor, got {type(params[n]).__name__}")
        return [params[n] for n in names], lambda ts: dict(zip(names, ts)), names
    if isinstance(params, Sequence) and not isinstance(params, str):
        ts = list(params)
        if not ts or not all(isinstance(t, Tensor) for t in ts):
            raise TypeError("params must be a Tensor, a non-empty sequence of Tensors or a dict "
                            "name -> Tensor")
        return ts, (lambda xs: type(params)(xs) if isinstance(params, tuple) else list(xs)), None
    raise TypeError(f"params must be a Tensor, a sequence of Tensors or a dict, got "
                    f"{type(params).__name__}")


def as_leaves(tensors: list[Tensor]) -> list[Tensor]:
    """Tensors that require grad: kept as they are (so gradients reach the caller's graph), or a
    fresh leaf copy for those that do not."""
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"parameters must be floating point, got dtype {t.dtype}")
    return [t if t.requires_grad else t.detach().requires_grad_(True) for t in tensors]


def grads(out: Tensor, inputs: list[Tensor], *, create_graph: bool = False,
          retain_graph: bool | None = None, grad_outputs: Any = None) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the output does not depend on."""
    if not out.requires_grad:  # e.g. the gradient of a linear function: its Hessian is 0
        return [torch.zeros_like(p) for p in inputs]
    gs = torch.autograd.grad(out, inputs, grad_outputs=grad_outputs, create_graph=create_graph,
                             retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, inputs)]


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``Σ_k ⟨a_k, b_k⟩`` over a list of tensors (differentiable)."""
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()


def check_common(lr: float, weight_decay: float) -> tuple[float, float]:
    return check_positive("lr", lr), check_positive("weight_decay", weight_decay, allow_zero=True)


def check_n_steps(n_steps: int | None) -> int | None:
    return None if n_steps is None else check_int("n_steps", n_steps, minimum=1)


def entropic_coefficient(lr: float, n_steps: int | None, correction: float = 1.0) -> float:
    """``(lr/4)·c·(1 − 1/n)``, the coefficient of ``gᵀΛg`` in ``F_n`` (``n = ∞`` when None)."""
    frac = 1.0 if n_steps is None else 1.0 - 1.0 / n_steps
    return lr / 4.0 * correction * frac


def model_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by name, after checking that every parameter is finite."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = select_parameters(model)
    _check_finite_model(model)
    return params


def _check_finite_model(model: nn.Module) -> None:
    """``check_finite_params`` with one reduction for the whole model: NaN and ±Inf propagate
    through sums, so a finite sum of the per-parameter sums proves every entry finite (one
    host sync instead of one per parameter). Anything else (a non-finite or overflowing sum, mixed
    dtypes or devices) falls back to the per-parameter check, which names the culprit."""
    try:
        with torch.no_grad():
            total = torch.stack([p.sum() for p in model.parameters()]).sum()
        if bool(torch.isfinite(total)):
            return
    except (RuntimeError, TypeError):
        pass
    check_finite_params(model)


def batch_objective(model: nn.Module, loss_fn: Callable[..., Tensor] | None, batch: Any, *,
                    weight_decay: float = 0.0, name: str = "batch") -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``θ ↦ l(θ) + (wd/2)‖θ‖²`` as a pure function of a dict of parameters (by name).

    ``batch`` is data of the data model (``neurothermo._data``; ``docs/data.md``): one batch, whose
    mean loss ``l_B`` is ``l``, or an iterable of batches, for which ``l = Σ_m (b_m/N)·l_{B_m}`` is
    the mean over all their samples (every batch's graph is kept until the result is freed).
    The forward pass goes through ``torch.func.functional_call``; parameters missing from the dict
    (frozen ones) and the buffers are the model's own, except the buffers of BatchNorm layers in
    train mode: each call gets fresh copies of those, which the layer updates instead of the
    model's running statistics. (Restoring the originals in place afterwards would break the
    backward pass of the returned loss, which holds on to them.) Run it inside
    ``preserved_state`` all the same, for other modules that change state in ``forward``. When
    ``params`` are the model's own parameter tensors and no BatchNorm is in train mode, the
    substitution is the identity and the model is called directly (the same computation, without
    ``functional_call``'s per-call re-registration of every parameter).
    """
    check_loss_fn(loss_fn)
    batches = as_data(batch, loss_fn, name=name, model=model).batches()
    n_total = sum(b.size for b in batches)
    bn_buffers = {
        f"{mod_name}.{buf_name}" if mod_name else buf_name: buf
        for mod_name, mod in model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training
        for buf_name, buf in mod.named_buffers(recurse=False)
    }

    def objective(params: Mapping[str, Tensor]) -> Tensor:
        if not bn_buffers and _are_own_parameters(model, params):
            net: Callable[..., Any] = model  # what functional_call would compute, without re-registering
        else:
            def net(*args: Any, **kwargs: Any) -> Any:
                return functional_call(model, {**params, **{k: b.clone() for k, b in bn_buffers.items()}},
                                       args, kwargs)
        terms = [b.loss(net, loss_fn) * (b.size / n_total) if len(batches) > 1 else b.loss(net, loss_fn)
                 for b in batches]
        loss = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
        if weight_decay:
            loss = loss + 0.5 * weight_decay * torch.stack(
                [(p * p).sum() for p in params.values()]).sum()
        return loss

    return objective


def _are_own_parameters(model: nn.Module, params: Mapping[str, Tensor]) -> bool:
    """Whether every entry of ``params`` is the very tensor registered under its name in
    ``model`` (then ``functional_call(model, params, ...)`` is ``model(...)``)."""
    own = dict(model.named_parameters())
    return all(own.get(n) is t for n, t in params.items())


def check_data(data: Any, batch_size: int, replacement: bool, loss_fn: Any = None, *,
               model: nn.Module | None = None, num_data: int | None = None) -> tuple[Data, int, int]:
    """Check a dataset (data model, ``docs/data.md``) and the minibatch size; return data, N, b."""
    d = as_data(data, loss_fn, name="data", model=model)
    n = check_num_data(num_data, d.count())
    if n < 2:
        raise ValueError(
            "data has 1 sample; the gradient covariance Σ over a dataset needs at least 2 samples "
            "(pass the whole dataset, or a subset of it, as data)"
        )
    b = check_int("batch_size", batch_size, minimum=1)
    if not isinstance(replacement, bool):
        raise TypeError(f"replacement must be a bool, got {replacement!r}")
    if not replacement and b > n:
        raise ValueError(
            f"batch_size={b} > N={n} samples in data: minibatches drawn without replacement cannot be "
            "larger than the dataset; lower batch_size or pass replacement=True"
        )
    return d, n, b


def batch_noise_factor(n: int, b: int, replacement: bool) -> float:
    """``Tr Σ_B / Tr Σ``: ``1/b`` with replacement, ``(N − b)/(b(N − 1))`` without."""
    return 1.0 / b if replacement else (n - b) / (b * (n - 1))
