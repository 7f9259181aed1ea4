"""Matrix learning rates Λ: the entropic loss of an optimizer other than plain SGD (docs/theory.md §1).

A step ``θ' = θ − η·Λ·g`` with a diagonal ``Λ`` frozen on the slow time scale has the entropic loss

    φ = l + c·(η/4)·gᵀΛg,     flowing as  θ̇ = −Λ∇φ,

with ``c = 1``. :func:`preconditioner_from` reads Λ off an optimizer's current state:

* Adam / AdamW: ``Λ = 1/(√v̂ + ε)`` with ``v̂ = v/(1 − β₂ᵗ)`` (AMSGrad: the running maximum).
  The first-moment average (β₁) is ignored: it is an exponential average whose steady state is
  ``g`` itself, so it changes no time scale, but its lag is *not* modelled (``exact=False`` when
  β₁ > 0). AdamW's decoupled decay ``−η·wd·θ`` is not preconditioned and is not part of Λ.
* RMSprop: ``Λ = 1/(√v + ε)`` (centered: ``1/(√(v − m²) + ε)``), no bias correction, as torch.
* SGD: ``Λ = I``. With heavy-ball momentum β (and dampening τ) docs/theory.md's leading-order
  approximation (Ghosh et al. 2023) applies: the iterates follow gradient flow with
  ``Λ = (1 − τ)/(1 − β)`` on ``L + η(1 − τ)(1 + β)/(4(1 − β)²)·‖∇L‖²``, i.e. ``c = (1 + β)/(1 − β)``
  in the form above. This is an approximation (``exact=False``), including for RMSprop's momentum.

Parameter groups with different learning rates are folded into Λ relative to the first group's
``lr`` (stored as :attr:`Preconditioner.lr`): pass ``lr=pre.lr`` to the entropic functions.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class Preconditioner:
    """A diagonal matrix learning rate Λ by parameter name and the entropic factor ``c``.

    ``diag[name]`` broadcasts against the parameter (a 0-dim tensor is a scalar block).
    ``lr`` is the learning rate Λ is normalised to (the optimizer's first group), ``correction``
    the ``c`` of ``φ = l + c(η/4)gᵀΛg``; ``exact`` is False where a momentum approximation enters,
    and ``note`` says which. Built by :func:`preconditioner_from`, or by hand; the instance is a
    frozen record that the entropic functions accept as ``preconditioner=``.

    Args:
        diag: ``{name: Λ block}``, each tensor broadcasting to its parameter (entries ≥ 0).
        lr: the learning rate Λ is normalised to; None if not tied to an optimizer.
        correction: the factor ``c`` of the entropic term (1 for plain SGD).
        exact: False where an approximation (momentum) enters.
        note: which approximation, in words.
        weight_decay: the optimizer's own (coupled, torch ``wd``) weight decay, to pass on as
            ``weight_decay=``.

    Raises:
        Nothing: at construction. The entries are checked where Λ is used: a ``ValueError``
            for a missing parameter, a shape that does not broadcast, or entries that are
            negative or not finite.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> pre = nt.Preconditioner({n: torch.tensor(0.5) for n, _ in model.named_parameters()}, lr=0.1)
        >>> force = nt.entropic_force(model, loss_fn, (x, y), lr=0.1, preconditioner=pre)  # −(lr/2)·H Λ g
        >>> force["2.bias"].shape
        torch.Size([3])
    """

    diag: Mapping[str, Tensor]
    lr: float | None = None
    correction: float = 1.0
    exact: bool = True
    note: str = ""
    weight_decay: float = field(default=0.0)


def _names(optimizer: torch.optim.Optimizer, model: nn.Module | None) -> dict[int, str]:
    by_id: dict[int, str] = {}
    if model is not None:
        by_id = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if id(p) in by_id:
                continue
            names = group.get("param_names")
            if names is None:
                raise ValueError(
                    "cannot name the optimizer's parameters: build it from "
                    "model.named_parameters() or pass model= to preconditioner_from"
                )
            by_id[id(p)] = names[i]
    return by_id


def _scalar(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def preconditioner_from(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> Preconditioner:
    """Λ of an Adam / AdamW / RMSprop / SGD optimizer's current state, normalised so that its step is
    ``θ' = θ − lr·Λ·g`` (momentum SGD: docs/theory.md's heavy-ball approximation, ``exact=False``).

    Names come from ``optimizer.param_groups[k]["param_names"]`` (optimizers built from
    ``model.named_parameters()``) or from ``model``. Adam-type optimizers need at least one step
    taken (Λ is read from the second-moment state). The optimizer's own weight decay is recorded in
    :attr:`Preconditioner.weight_decay`; pass it as ``weight_decay=`` (L2, coupled, as in SGD/Adam;
    AdamW's decoupled decay is a different dynamics and is not represented).

    Args:
        optimizer: a ``torch.optim`` Adam, AdamW, RMSprop or SGD instance.
        model: the model the optimizer trains, to name its parameters; None when the optimizer
            was built from ``model.named_parameters()``.

    Returns:
        A :class:`Preconditioner` with ``diag`` by parameter name, ``lr`` the first group's
        learning rate, ``correction`` the momentum factor ``c``, ``exact`` and ``note``.

    Raises:
        TypeError: ``optimizer`` not a ``torch.optim.Optimizer``, or of another kind.
        ValueError: unnamed parameters (no ``param_names``, no ``model``), a learning rate ≤ 0,
            ``maximize=True``, different momenta across groups (different weight decays only add
            a ``note``), Nesterov SGD, an Adam-type or RMSprop optimizer without a step taken.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        >>> loss_fn(model(x), y).backward(); opt.step()  # Λ is read from Adam's second moments
        >>> pre = nt.preconditioner_from(opt, model)
        >>> phi = nt.entropic_loss(model, loss_fn, (x, y), lr=1e-3, preconditioner=pre)
        >>> phi.ndim
        0
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    kind = type(optimizer).__name__
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW | torch.optim.RMSprop
                      | torch.optim.SGD):
        raise TypeError(f"preconditioner_from supports Adam, AdamW, RMSprop and SGD, got {kind}")
    names = _names(optimizer, model)
    groups = optimizer.param_groups
    lr0 = _scalar(groups[0]["lr"])
    if lr0 <= 0:
        raise ValueError(f"the optimizer's learning rate is {lr0}; it must be > 0")
    diag: dict[str, Tensor] = {}
    corrections: set[float] = set()
    exact = True
    notes: list[str] = []
    wds = {_scalar(g.get("weight_decay", 0.0)) for g in groups}
    for group in groups:
        if group.get("maximize", False):
            raise ValueError("optimizer has maximize=True; the entropic loss describes minimisation")
        scale = _scalar(group["lr"]) / lr0
        for p in group["params"]:
            name = names[id(p)]
            lam, c, ex, note = _diag_for(optimizer, group, p, name)
            diag[name] = lam * scale
            corrections.add(c)
            exact = exact and ex
            if note and note not in notes:
                notes.append(note)
    if len(corrections) != 1:
        raise ValueError("parameter groups use different momenta; the heavy-ball approximation "
                         "needs one momentum for all groups")
    if len(wds) != 1:
        notes.append("parameter groups use different weight decays; weight_decay holds the first")
    if isinstance(optimizer, torch.optim.Adam) and groups[0].get("decoupled_weight_decay", False):
        notes.append("decoupled (AdamW) weight decay is not part of Λ")
    return Preconditioner(diag=diag, lr=lr0, correction=corrections.pop(), exact=exact,
                          note="; ".join(notes), weight_decay=_scalar(groups[0].get("weight_decay", 0.0)))


def _diag_for(optimizer: torch.optim.Optimizer, group: dict[str, Any], p: Tensor,
              name: str) -> tuple[Tensor, float, bool, str]:
    state = optimizer.state.get(p, {})
    if isinstance(optimizer, torch.optim.SGD):
        beta = _scalar(group.get("momentum", 0.0))
        if beta == 0:
            return torch.ones((), dtype=p.dtype, device=p.device), 1.0, True, ""
        if group.get("nesterov", False):
            raise ValueError("SGD with nesterov=True: no leading-order approximation is implemented "
                             "(docs/theory.md covers heavy-ball momentum); use nesterov=False")
        tau = _scalar(group.get("dampening", 0.0))
        lam = torch.full((), (1 - tau) / (1 - beta), dtype=p.dtype, device=p.device)
        return lam, (1 + beta) / (1 - beta), False, (
            f"heavy-ball approximation (momentum {beta}): Λ = (1−τ)/(1−β), c = (1+β)/(1−β)")
    if isinstance(optimizer, torch.optim.RMSprop):
        if "square_avg" not in state:
            raise ValueError(f"RMSprop has no state for parameter {name!r} yet; take at least one "
                             "optimizer step before reading its preconditioner")
        v = state["square_avg"]
        if group.get("centered", False):
            v = v - state["grad_avg"] ** 2
        lam = 1.0 / (v.clamp_min(0).sqrt() + group["eps"])
        mom = _scalar(group.get("momentum", 0.0))
        if mom > 0:
            return lam / (1 - mom), (1 + mom) / (1 - mom), False, (
                f"RMSprop momentum {mom}: heavy-ball approximation on the preconditioned gradient")
        return lam, 1.0, True, ""
    # Adam / AdamW
    if "exp_avg_sq" not in state:
        raise ValueError(f"{type(optimizer).__name__} has no state for parameter {name!r} yet; take at "
                         "least one optimizer step before reading its preconditioner")
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    step = _scalar(state["step"])
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    v_hat = v / (1 - beta2**step)
    lam = 1.0 / (v_hat.sqrt() + group["eps"])
    note = f"Adam β₁ = {beta1} momentum ignored (Λ from the second moment only)" if beta1 else ""
    return lam, 1.0, beta1 == 0, note


def resolve(preconditioner: Any, names: list[str] | None, tensors: list[Tensor]) -> tuple[list[Tensor] | None, float]:
    """Λ as a list aligned with ``tensors`` (None for Λ = I) and the factor ``c``; checks shapes
    and values. Accepts a :class:`Preconditioner`, a dict by name (dict params), a tensor or number
    (single tensor params, or one block for all), or a sequence aligned with the params."""
    if preconditioner is None:
        return None, 1.0
    correction = 1.0
    diag: Any = preconditioner
    if isinstance(preconditioner, Preconditioner):
        diag, correction = preconditioner.diag, float(preconditioner.correction)
    if isinstance(diag, Mapping):
        if names is None:
            raise TypeError("a preconditioner given by name needs params given as a dict by name")
        missing = [n for n in names if n not in diag]
        if missing:
            raise ValueError(f"preconditioner has no entry for parameter(s) {missing[:5]}; "
                             f"it has {sorted(diag)[:5]}")
        lams = [diag[n] for n in names]
    elif isinstance(diag, Tensor | float | int) and not isinstance(diag, bool):
        lams = [diag] * len(tensors)
    elif isinstance(diag, list | tuple) and len(diag) == len(tensors):
        lams = list(diag)
    else:
        raise TypeError("preconditioner must be None, a Preconditioner, a dict name -> Tensor, a "
                        "Tensor or number, or a sequence aligned with params; got "
                        f"{type(preconditioner).__name__}")
    out: list[Tensor] = []
    for i, (lam, t) in enumerate(zip(lams, tensors)):
        label = names[i] if names is not None else str(i)
        lam_t = torch.as_tensor(lam, dtype=t.dtype, device=t.device)
        try:  # torch.broadcast_shapes carries no annotations in torch itself
            shape = torch.broadcast_shapes(lam_t.shape, t.shape)  # type: ignore[no-untyped-call]
        except RuntimeError:
            raise ValueError(f"preconditioner for {label!r} has shape {tuple(lam_t.shape)}, which "
                             f"does not broadcast to the parameter's {tuple(t.shape)}") from None
        if shape != t.shape:
            raise ValueError(f"preconditioner for {label!r} has shape {tuple(lam_t.shape)}, larger "
                             f"than the parameter's {tuple(t.shape)}")
        if not bool(torch.isfinite(lam_t).all()) or bool((lam_t < 0).any()):
            raise ValueError(f"preconditioner for {label!r} must be finite and >= 0 (a diagonal "
                             "positive semi-definite Λ)")
        out.append(lam_t.detach())
    if not (correction >= 0 and correction < float("inf")):
        raise ValueError(f"preconditioner correction must be finite and >= 0, got {correction}")
    return out, correction
