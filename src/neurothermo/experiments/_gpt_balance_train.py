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

Per step ``t`` and per charged symmetry the loop streams (:class:`Trace`): the exact identity's
largest residual over its round-off bound (needs ``J_t``, ``J_{t+1}``, the minibatch imbalance
``g_tᵀAg_t`` — gradient of the loss, without the weight-decay term — the in/out energies of the
gradient and the gross ``Σ_in‖M‖² + Σ_out‖M‖²`` of the parameters), and block sums of the law's
``x_t = gᵀAg_t − c·N_t`` over fixed windows. Nothing is kept per step, so memory does not grow
with the number of steps, and every record stays on the model's device until the run ends.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from neurothermo.experiments import _char_lm as lm
from neurothermo.experiments import _gpt_balance_checks as ck
from neurothermo.experiments._gpt_balance_checks import role_energy
from neurothermo.experiments._gpt_balance_precon import PreconTrace, adamw_metric
from neurothermo.symmetry.base import Symmetry

FAMILIES = ("qk", "vo", "mlp", "ln")
FAMILY_LABEL = {"qk": "Q/K rotation", "vo": "V/O rotation", "mlp": "MLP unit rescale",
                "ln": "LayerNorm → next layer rescale"}


def build_gpt(vocab: int, d_model: int, n_layers: int, n_heads: int, seq_len: int,
              seed: int, dtype: torch.dtype, init_std: float = 0.02,
              attn_init_std: float = 0.0, mlp_init_std: float = 0.0) -> nn.Module:
    """A random-init GPT-2 (ReLU MLP, no dropout) of the given size, in ``dtype``.

    ``init_std``: HF's ``initializer_range`` (its attention ``c_proj`` gets ``init_std/√(2·n_layers)``).
    ``attn_init_std > 0`` redraws every attention weight (the fused Q|K|V ``c_attn`` and ``c_proj``)
    from N(0, attn_init_std²), e.g. ``1/√d_model`` (fan-in init): with GPT-2's 0.02 each of W_Q,
    W_K gets a gradient ∝ the other's tiny weight, and plain SGD with weight decay never trains
    them (docs/experiments/gpt-balance.md). ``mlp_init_std > 0`` does the same for the MLP's
    ``c_fc`` and ``c_proj`` weights: the rescale symmetry between them makes each one's gradient
    ∝ the other, so from GPT-2's small init weight decay wins there too. The redraws use the
    seeded global generator too.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=d_model, n_layer=n_layers,
                     n_head=n_heads, activation_function="relu", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     initializer_range=init_std)
    torch.manual_seed(seed)  # HF initialises from the global generator
    model: nn.Module = GPT2LMHeadModel(cfg)
    if attn_init_std > 0 or mlp_init_std > 0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if attn_init_std > 0 and name.endswith(("attn.c_attn.weight",
                                                        "attn.c_proj.weight")):
                    p.normal_(0.0, attn_init_std)
                if mlp_init_std > 0 and name.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
                    p.normal_(0.0, mlp_init_std)
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


def unit_scalar(j: Tensor) -> Tensor:
    """Per head the trace of a rotation's matrix charge, per unit a rescale's charge: ``(U,)``."""
    if j.ndim == 1:
        return j
    return torch.diagonal(j.reshape(-1, j.shape[-2], j.shape[-1]), dim1=-2, dim2=-1).sum(-1)


def charge_size(j: Tensor) -> Tensor:
    """``Σ|J|`` over heads (Frobenius norm of each head's matrix) or units (absolute value)."""
    if j.ndim == 1:
        total: Tensor = j.abs().sum()
        return total
    per_head: Tensor = j.reshape(-1, j.shape[-2] * j.shape[-1]).norm(dim=1)
    return per_head.sum()


@dataclass(frozen=True)
class Window:
    """Steps ``[start, stop)`` in ``n_blocks`` consecutive near-equal blocks (``np.array_split``)."""

    start: int
    stop: int
    n_blocks: int

    def sizes(self) -> list[int]:
        q, r = divmod(self.stop - self.start, self.n_blocks)
        return [q + 1] * r + [q] * (self.n_blocks - r)

    def block_index(self) -> dict[int, int]:
        """``step → block`` for the steps inside the window."""
        out, t = {}, self.start
        for i, n in enumerate(self.sizes()):
            for _ in range(n):
                out[t] = i
                t += 1
        return out


class WindowSums:
    """Streamed sums over one window, per unit/head (``U`` = heads or units), on the device:
    block sums of ``x_t = gᵀAg_t − c·N_t``, of ``N_t`` and of the gross, the window sums of ``gᵀAg``, ``c·N``, ``e_in``,
    ``e_out``, and ``N`` at the window's first step and after its last."""

    def __init__(self, win: Window, like: Tensor) -> None:
        self.win = win
        self.index = win.block_index()
        z = torch.zeros_like(like)
        self.blocks = torch.zeros((win.n_blocks, *like.shape), dtype=like.dtype,
                                  device=like.device)
        self.gross_blocks = torch.zeros_like(self.blocks)
        self.n_blocks = torch.zeros_like(self.blocks)
        self.gag, self.cn, self.e_in, self.e_out = z.clone(), z.clone(), z.clone(), z.clone()
        self.n_start, self.n_end = z.clone(), z.clone()
        self.gross_start, self.gross_end = z.clone(), z.clone()

    def add(self, t: int, gag: Tensor, n_t: Tensor, c: float, e_in: Tensor, e_out: Tensor,
            gross: Tensor) -> None:
        i = self.index.get(t)
        if i is None:
            return
        if t == self.win.start:
            self.n_start, self.gross_start = n_t.clone(), gross.clone()
        self.blocks[i] += gag - c * n_t
        self.gross_blocks[i] += gross
        self.n_blocks[i] += n_t
        self.gag += gag
        self.cn += c * n_t
        self.e_in += e_in
        self.e_out += e_out

    def close(self, t_next: int, n_next: Tensor, gross_next: Tensor) -> None:
        if t_next == self.win.stop:
            self.n_end, self.gross_end = n_next.clone(), gross_next.clone()

    def numpy(self) -> dict[str, np.ndarray]:
        keys = ("blocks", "gag", "cn", "e_in", "e_out", "n_start", "n_end",
                "gross_start", "gross_end", "gross_blocks", "n_blocks")
        return {k: getattr(self, k).double().cpu().numpy() for k in keys}


class Trace:
    """Streamed record of one charged symmetry along a run; memory independent of the steps.

    Per step it checks the exact identity (largest residual over its round-off bound, see
    :mod:`._gpt_balance_checks`; ``ident_wd`` is the weight decay the identity is checked with,
    the run's by default) and adds ``gᵀAg`` and the noise-driven charge
    ``N_t = J_t − (1 − η·wd)^{2t}J_0`` (per head: traces) into each window's block sums. It keeps
    ``J_0``, the last ``J``, ``Σ_t |gᵀAg_t|`` and the largest gross (for the small-η control) and,
    at ≤ ``len(samples)`` steps, ``Σ|J|`` and ``Σ gross`` (for the figure).
    """

    def __init__(self, sym: Symmetry, fam: str, params: Mapping[str, Tensor], lr: float,
                 wd: float, law_c: float, windows: Mapping[str, Window], samples: set[int],
                 ident_wd: float | None = None) -> None:
        self.sym, self.fam, self.layer = sym, fam, layer_of(sym)
        self.lr, self.wd, self.c = lr, wd, law_c
        self.keep = (1.0 - lr * (wd if ident_wd is None else ident_wd)) ** 2
        self.decay = (1.0 - lr * wd) ** 2
        self.j0 = sym.charge(params).double()
        self.j = self.j0
        self.u0 = unit_scalar(self.j0)
        self.gross = role_energy(sym, params, "in") + role_energy(sym, params, "out")
        self.gross_max = self.gross.clone()
        self.sum_abs_gag = torch.zeros_like(self.j0)
        self.ident = torch.zeros((), dtype=torch.float64, device=self.j0.device)
        self.sums = {k: WindowSums(w, self.u0) for k, w in windows.items()}
        self.samples = samples
        self.series: list[tuple[int, Tensor, Tensor]] = []
        self._sample(0)
        self._g: tuple[Tensor, Tensor, Tensor] | None = None

    def _sample(self, t: int) -> None:
        if t in self.samples:
            self.series.append((t, charge_size(self.j), self.gross.sum()))

    def grad(self, grads: Mapping[str, Tensor]) -> None:
        """Record ``gᵀAg`` and the in/out energies of the step's minibatch gradient."""
        self._g = (self.sym.imbalance(grads).double(), role_energy(self.sym, grads, "in"),
                   role_energy(self.sym, grads, "out"))

    def after(self, t: int, params: Mapping[str, Tensor]) -> None:
        """Step ``t`` is done (``params`` now hold θ_{t+1}): check the identity, add to sums."""
        if self._g is None:
            raise RuntimeError("Trace.after before Trace.grad")
        gag, e_in, e_out = self._g
        j1 = self.sym.charge(params).double()
        g1 = role_energy(self.sym, params, "in") + role_energy(self.sym, params, "out")
        resid = (j1 - self.keep * self.j - self.lr**2 * gag).abs()
        bound = ck.KAPPA * ck.EPS64 * (self.gross + g1 + self.lr**2 * (e_in + e_out))
        ratio = resid.reshape(bound.shape[0], -1) / bound[:, None]
        self.ident = torch.maximum(self.ident, ratio.max())
        self.sum_abs_gag += gag.abs()
        u_gag = unit_scalar(gag)
        n_t = unit_scalar(self.j) - self.decay**t * self.u0
        n_next = unit_scalar(j1) - self.decay ** (t + 1) * self.u0
        for s in self.sums.values():
            s.add(t, u_gag, n_t, self.c, e_in, e_out, self.gross)
            s.close(t + 1, n_next, g1)
        self.j, self.gross = j1, g1
        self.gross_max = torch.maximum(self.gross_max, g1)
        self._sample(t + 1)
        self._g = None

    def series_numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, Σ|J|, Σ gross) at the sampled steps."""
        t = np.array([s[0] for s in self.series], dtype=np.float64)
        if not self.series:
            return t, t, t
        size = torch.stack([s[1] for s in self.series]).double().cpu().numpy()
        gross = torch.stack([s[2] for s in self.series]).double().cpu().numpy()
        return t, size, gross


@dataclass(frozen=True)
class RunSpec:
    """One training run: optimiser ``sgd``/``adamw``, constant ``lr``, ``wd`` and the number of steps.

    ``beta1``: AdamW's first-moment decay (0: no momentum, where the rescale charges in AdamW's
    geometry obey an exact identity, :mod:`._gpt_balance_precon`); β₂ is torch's 0.999.

    ``unshield``: ``(param name, dim, start, stop)`` slices that get no weight decay (the broken
    control; the decay is then applied by hand to the rest of that tensor).
    """

    optimizer: str
    lr: float
    wd: float
    steps: int
    unshield: tuple[tuple[str, int, int, int], ...] = ()
    beta1: float = 0.9


def _decay_mask(params: Mapping[str, Tensor], spec: RunSpec) -> dict[str, Tensor]:
    masks: dict[str, Tensor] = {}
    for name, dim, start, stop in spec.unshield:
        m = masks.setdefault(name, torch.ones_like(params[name]))
        m.narrow(dim, start, stop - start).zero_()
    return masks


@dataclass
class Recorded:
    """A run's streamed record: the traces, ``(step, loss)`` at the logged steps, the mean
    training loss of the last tenth of the steps and, for AdamW, the preconditioned identity of
    every rescale symmetry (:class:`PreconTrace`)."""

    traces: list[Trace]
    logged: list[tuple[int, float]]
    late_loss: float
    precon: list[PreconTrace] = field(default_factory=list)


def train_recorded(model: nn.Module, syms: list[Symmetry], data: lm.CharData, spec: RunSpec,
                   batch_size: int, seq_len: int, g: torch.Generator,
                   log: Callable[..., None], advance: Callable[[int], None],
                   log_every: int, windows: Mapping[str, Window] | None = None,
                   n_samples: int = 300, law_c: float | None = None,
                   ident_wd: float | None = None) -> Recorded:
    """Train ``model`` in place, streaming every charged symmetry's record at every step.

    Memory does not grow with ``spec.steps``: each :class:`Trace` keeps sums over ``windows``
    and ≤ ``n_samples + 1`` sampled points. ``law_c`` is the constant ``c`` of ``x = gᵀAg − c·N``
    (default ``wd(2 − η·wd)/η``); ``ident_wd`` the weight decay the identity is checked with.

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
            lr=spec.lr, betas=(spec.beta1, 0.999))
    c = spec.wd * (2.0 - spec.lr * spec.wd) / spec.lr if law_c is None else law_c
    samples = {int(v) for v in np.linspace(0, spec.steps, n_samples + 1)}
    samples |= {t for w in (windows or {}).values() for t in (w.start, w.stop)}
    with torch.no_grad():
        traces = [Trace(s, f, named, spec.lr, spec.wd, c, windows or {}, samples, ident_wd)
                  for s in syms if (f := family(s)) is not None]
    precon = [PreconTrace(s, f, spec.lr, spec.wd) for s in syms
              if (f := family(s)) in ("mlp", "ln")] if spec.optimizer == "adamw" else []
    pnames = sorted({n for p in precon for n in p.names})
    param_of = {n: named[n] for n in pnames}
    net = Logits(model)
    late_from = spec.steps - max(1, spec.steps // 10)
    log_sum: Tensor | None = None
    late_sum: Tensor | None = None
    logged: list[tuple[int, float]] = []
    for step in range(spec.steps):
        seqs = lm.windows(data.train, batch_size, seq_len + 1, g)
        loss = lm.next_char_loss(net, seqs)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        with torch.no_grad():
            grads = {n: p.grad for n, p in named.items() if p.grad is not None}
            for tr in traces:
                tr.grad(grads)
            for n, m in masks.items():  # decay by hand where the mask is 1: the broken control
                named[n].grad.add_(named[n] * m, alpha=spec.wd)  # type: ignore[union-attr]
        before = {n: p.detach().clone() for n, p in param_of.items()}
        opt.step()
        with torch.no_grad():
            for tr in traces:
                tr.after(step, named)
            if precon:
                by_param = adamw_metric(opt, list(param_of.values()))
                metric = {n: by_param[p] for n, p in param_of.items()}
                for pt in precon:
                    pt.after(before, named, grads, metric)
        lv = loss.detach()
        log_sum = lv if log_sum is None else log_sum + lv
        if step >= late_from:
            late_sum = lv if late_sum is None else late_sum + lv
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            n_log = (step % log_every) + 1
            value = float(log_sum) / n_log
            log_sum = None
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"{spec.optimizer}: training loss became {value} by step {step + 1}; lower lr "
                    f"(now {spec.lr})")
            logged.append((step + 1, value))
            log(step + 1, run=spec.optimizer, train_loss=value)
            advance(n_log)
    late = float(late_sum) / (spec.steps - late_from) if late_sum is not None else math.nan
    return Recorded(traces, logged, late, precon)


def warm_start(model: nn.Module, data: lm.CharData, steps: int, lr: float, batch_size: int,
               seq_len: int, g: torch.Generator) -> float:
    """Train ``model`` in place by AdamW (no weight decay) for ``steps``; return the mean loss of
    the last tenth. Not recorded: it only brings the model to where its features (the attention
    logits included) are learned, so the recorded SGD runs start near a trained state.

    Raises:
        FloatingPointError: the loss became NaN/inf (lower ``lr``).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    net = Logits(model)
    late: Tensor | None = None
    tail = max(1, steps // 10)
    for step in range(steps):
        loss = lm.next_char_loss(net, lm.windows(data.train, batch_size, seq_len + 1, g))
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
        if step >= steps - tail:
            late = loss.detach() if late is None else late + loss.detach()
    value = float(late) / tail if late is not None else math.nan
    if steps and not math.isfinite(value):
        raise FloatingPointError(f"warm start: AdamW loss became {value}; lower warmup_lr "
                                 f"(now {lr})")
    return value
