"""A small pre-LN decoder-only transformer, written plainly (docs/theory.md §3, §5.4).

``tokens (b, T) → logits (b, T, V)``::

    x_0 = E_tok[tokens] + E_pos[0..T−1]
    a_l = Attn_l(LN(x_{l−1}))          # the attention-block output of layer l (``blocks.l.attn``)
    y_l = x_{l−1} + a_l
    m_l = MLP_l(LN(y_l))               # the MLP-block output of layer l (``blocks.l.mlp``)
    x_l = y_l + m_l
    logits = W_head · LN(x_L)

``Attn`` is multi-head causal self-attention with hand-written ``q``, ``k``, ``v``, ``o`` Linear
layers: per head ``softmax(q kᵀ/√d_head + M) v`` with ``M_ts = −∞`` for ``s > t`` (position t sees
positions ≤ t only), heads concatenated and mapped by ``o``. ``MLP`` is
``fc2(act(fc1(h)))`` with ``act`` GELU or ReLU. ``blocks.l.attn`` and ``blocks.l.mlp`` are
submodules that return exactly ``a_l`` and ``m_l`` (before the residual add), so forward hooks
(:func:`neurothermo.alignment.capture_features`) capture the two block outputs separately;
:meth:`TinyTransformer.block_names` lists their names.

Initialisation (GPT-2's): every Linear and embedding weight ``N(0, 0.02²)``, biases 0, the two
projections that write into the residual stream (``o``, ``fc2``) ``N(0, (0.02/√(2L))²)``;
LayerNorm weight 1, bias 0. Pass ``generator`` for a reproducible init.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class CausalSelfAttention(nn.Module):
    """``o(concat_h softmax(q_h k_hᵀ/√d_head + causal mask) v_h)`` on ``(b, T, d)`` inputs."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:  # (b, T, d) -> (b, heads, T, d_head)
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

    def weights(self, x: Tensor) -> Tensor:
        """Attention probabilities ``(b, heads, T, T)``; row t is zero beyond column t."""
        q, k = self._heads(self.q(x)), self._heads(self.k(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        t = x.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        return scores.masked_fill(future, float("-inf")).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        y = self.weights(x) @ self._heads(self.v(x))
        out: Tensor = self.o(y.transpose(1, 2).reshape(b, t, d))
        return out


class FeedForward(nn.Module):
    """``fc2(act(fc1(h)))``, ``d_model → d_ff → d_model``."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, h: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.act(self.fc1(h)))
        return out


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``+ mlp(ln2(·))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_ff, activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


def _tracing() -> bool:
    """Whether the forward runs under torch.fx symbolic tracing or torch.compile/export capture."""
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing

    return bool(is_fx_symbolic_tracing() or torch.compiler.is_compiling())


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class TinyTransformer(nn.Module):
    """Decoder-only pre-LN transformer (see the module docstring); ``forward(tokens) -> logits``.

    ``d_ff`` defaults to ``4·d_model``. Submodules: ``tok_emb``, ``pos_emb``, ``blocks.0 …
    blocks.{L−1}`` (each with ``ln1``, ``attn``, ``ln2``, ``mlp``), ``ln_f``, ``head``.
    """

    def __init__(
        self, vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, *,
        d_ff: int | None = None, max_len: int = 128, activation: str = "gelu",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("max_len", max_len)):
            _positive(name, v)
        d_ff = 4 * d_model if d_ff is None else _positive("d_ff", d_ff)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; "
                             "choose n_heads dividing d_model")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.vocab_size, self.max_len = vocab_size, max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, activation) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self._init(generator, n_layers)

    def _init(self, generator: torch.Generator | None, n_layers: int) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_f"):
                    p.fill_(1.0)
                else:
                    std = 0.02 / math.sqrt(2 * n_layers) if name.endswith((".o.weight", ".fc2.weight")) else 0.02
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

    def block_names(self, kind: str) -> list[str]:
        """Module names of every layer's ``"attn"`` or ``"mlp"`` block output, in depth order."""
        if kind not in ("attn", "mlp"):
            raise ValueError(f"kind must be 'attn' or 'mlp', got {kind!r}")
        return [f"blocks.{i}.{kind}" for i in range(len(self.blocks))]

    def forward(self, tokens: Tensor) -> Tensor:
        if not _tracing():  # input checks are Python on values: graph capture skips them
            self._check(tokens)
        t = tokens.shape[1]
        # positions as [1, T] (broadcast over the batch, like Hugging Face position_ids)
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(t, device=tokens.device)[None])
        for block in self.blocks:
            x = block(x)
        out: Tensor = self.head(self.ln_f(x))
        return out

    def _check(self, tokens: Tensor) -> None:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (batch, T), got "
                             f"{tokens.dtype} of shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}; build the "
                             "model with a larger max_len or shorten the sequences")
        if tokens.numel() and not bool(((tokens >= 0) & (tokens < self.vocab_size)).all()):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
