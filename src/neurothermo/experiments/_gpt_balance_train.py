"""Model, symmetries and the recorded training loop of ``gpt-balance``.

The model is a Hugging Face ``GPT2LMHeadModel`` built from a small ``GPT2Config`` with random
init (no download): fused ``c_attn`` (Q | K | V columns of a ``Conv1D`` whose weight is laid out
``(in, out)``), ReLU MLP (so the MLP units have an exact rescale symmetry), no dropout. The
symmetries are those :func:`neurothermo.find_symmetries` finds, grouped into families by their
location string.

Loss: cross entropy in nats per character, mean over the ``b·T`` predicted characters of ``b``
random windows (:func:`neurothermo.experiments._char_lm.next_char_loss` on the model's logits).
Weight decay ``wd`` is torch's (the gradient gains ``wd·θ``; the paper's γ = wd/2) and acts on
every parameter, so every orbit is decayed as a whole, unless ``unshield`` names parameter slices
that it must skip (the broken-symmetry control).

Per step ``t`` and per charged symmetry the loop records the charge ``J_t`` (the full matrix per
head for the attention rotations), the minibatch imbalance ``g_tᵀAg_t`` (gradient of the loss,
without the weight-decay term), the in- and out-energies of the gradient per unit/head and the
gross size ``Σ_in‖M‖² + Σ_out‖M‖²`` of the parameters per unit/head (for round-off bounds and for
the normalised imbalance ``J/gross``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neurothermo.experiments import _char_lm as lm
from neurothermo.symmetry.base import Symmetry

FAMILIES = ("qk", "vo", "mlp", "ln")
FAMILY_LABEL = {"qk": "Q/K rotation", "vo": "V/O rotation", "mlp": "MLP unit rescale",
                "ln": "LayerNorm → next layer rescale"}


def build_gpt(vocab: int, d_model: int, n_layers: int, n_heads: int, seq_len: int,
              seed: int, dtype: torch.dtype, init_std: float = 0.02) -> nn.Module:
    """A random-init GPT-2 (ReLU MLP, no dropout) of the given size, in ``dtype``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=d_model, n_layer=n_layers,
                     n_head=n_heads, activation_function="relu", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     initializer_range=init_std)
    torch.manual_seed(seed)  # HF initialises from the global generator
    model: nn.Module = GPT2LMHeadModel(cfg)
    model = model.to(dtype)
    model.eval()  # no dropout anyway; eval keeps HF from any train-only path
    return model


class Logits(nn.Module):
    """``tokens → logits`` view of a HF causal LM (``forward`` returns a tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        result: Tensor = self.model(input_ids=tokens).logits
        return result


def family(sym: Symmetry) -> str | None:
    """``qk``/``vo``/``mlp``/``ln`` from the symmetry's kind and location; None for the rest."""
    if not sym.has_charge:
        return None
    loc = sym.location
    if sym.kind == "double_rotation":
        return "vo" if "→ attention →" in loc else "qk"
    if sym.kind == "rescale":
        return "mlp" if "relu" in loc else "ln" if ".ln_" in loc else None
    return None


def layer_of(sym: Symmetry) -> int:
    """The transformer block index named in the location (``…h.<i>.…``)."""
    part = sym.location.split(".h.", 1)[1]
    return int(part.split(".", 1)[0])


def role_energy(sym: Symmetry, source: Mapping[str, Tensor], role: str) -> Tensor:
    """``Σ_role ‖M‖²`` per unit (rescale) or per head (double rotation): shape ``(n_groups,)``."""
    total: Tensor | None = None
    for s in sym.slices:
        if s.role != role:
            continue
        u = s.unit_view(source[s.name].detach())
        q = u.reshape(sym.n_units, -1).square().sum(1)
        total = q if total is None else total + q
    if total is None:
        raise ValueError(f"{sym}: no {role!r} slices")
    return total.reshape(-1, sym.block).sum(1) if sym.block > 1 else total


@dataclass
class Trace:
    """Per-step records of one charged symmetry (float64, on the model's device until stacked)."""

    sym: Symmetry
    fam: str
    layer: int
    charge: list[Tensor]  # J_t, t = 0 … T (charge_shape)
    gag: list[Tensor]  # g_tᵀAg_t, t = 0 … T−1
    e_in: list[Tensor]  # (n_groups,)
    e_out: list[Tensor]
    gross: list[Tensor]  # Σ_in‖M‖² + Σ_out‖M‖² of the parameters, t = 0 … T, (n_groups,)
    lrs: list[float]

    def stacked(self, name: str) -> Tensor:
        return torch.stack(getattr(self, name)).double().cpu()


@dataclass(frozen=True)
class RunSpec:
    """One training run: optimiser ``sgd``/``adamw``, constant ``lr``, ``wd`` and the number of steps.

    ``unshield``: ``(param name, dim, start, stop)`` slices that get no weight decay (the broken
    control; the decay is then applied by hand to the rest of that tensor).
    """

    optimizer: str
    lr: float
    wd: float
    steps: int
    unshield: tuple[tuple[str, int, int, int], ...] = ()


def _decay_mask(params: Mapping[str, Tensor], spec: RunSpec) -> dict[str, Tensor]:
    masks: dict[str, Tensor] = {}
    for name, dim, start, stop in spec.unshield:
        m = masks.setdefault(name, torch.ones_like(params[name]))
        m.narrow(dim, start, stop - start).zero_()
    return masks


def train_recorded(model: nn.Module, syms: list[Symmetry], data: lm.CharData, spec: RunSpec,
                   batch_size: int, seq_len: int, g: torch.Generator,
                   log: Callable[..., None], advance: Callable[[int], None],
                   log_every: int) -> tuple[list[Trace], list[float]]:
    """Train ``model`` in place, recording every charged symmetry at every step.

    Returns the traces and the training loss of every step.

    Raises:
        FloatingPointError: the loss became NaN/inf (names the step and the way out).
    """
    named = dict(model.named_parameters())
    masks = _decay_mask(named, spec)
    plain = [p for n, p in named.items() if n not in masks]
    masked = [named[n] for n in masks]
    if spec.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            [{"params": plain, "weight_decay": spec.wd}, {"params": masked, "weight_decay": 0.0}],
            lr=spec.lr)
    else:
        opt = torch.optim.AdamW(
            [{"params": plain, "weight_decay": spec.wd}, {"params": masked, "weight_decay": 0.0}],
            lr=spec.lr)
    traces = [Trace(s, f, layer_of(s), [], [], [], [], [], []) for s in syms
              if (f := family(s)) is not None]

    def snapshot() -> None:
        for tr in traces:
            tr.charge.append(tr.sym.charge(named))
            tr.gross.append(role_energy(tr.sym, named, "in") + role_energy(tr.sym, named, "out"))

    net = Logits(model)
    losses: list[Tensor] = []
    snapshot()
    for step in range(spec.steps):
        seqs = lm.windows(data.train, batch_size, seq_len + 1, g)
        loss = lm.next_char_loss(net, seqs)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        grads = {n: p.grad for n, p in named.items() if p.grad is not None}
        for tr in traces:
            tr.gag.append(tr.sym.imbalance(grads))
            tr.e_in.append(role_energy(tr.sym, grads, "in"))
            tr.e_out.append(role_energy(tr.sym, grads, "out"))
            tr.lrs.append(spec.lr)
        if masks:  # decay by hand where the mask is 1: the broken control
            with torch.no_grad():
                for n, m in masks.items():
                    named[n].grad.add_(named[n] * m, alpha=spec.wd)  # type: ignore[union-attr]
        opt.step()
        snapshot()
        losses.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            value = float(torch.stack(losses[-log_every:]).mean())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{spec.optimizer}: training loss became {value} by step {step + 1}; lower lr "
                    f"(now {spec.lr})")
            log(step + 1, run=spec.optimizer, train_loss=value)
            advance(min(log_every, (step % log_every) + 1))
    return traces, [float(v) for v in torch.stack(losses)] if losses else []
