"""Models nobody here designed for: the layouts researchers actually train, built small.

Each :class:`ForeignCase` builds a model in a well-known third-party layout (torchvision's
ResNet-18, timm's ViT with one fused ``qkv`` Linear and ``F.scaled_dot_product_attention``, Hugging
Face BERT and GPT-2 from tiny random-init configs, LSTM and GRU classifiers, a GroupNorm CNN, a
language model with tied input/output embeddings), a batch for it, and a mean-reduced
``loss_fn(outputs, targets)``. The torchvision and timm layouts are written here because neither
package imports beside this torch build; parameter names and module nesting follow theirs, so code
that walks ``named_modules()`` sees what it would see on the real models.

Tests and benchmarks parametrise over :data:`CASES` (``pytest.mark.parametrize("case", CASES,
ids=CASE_IDS)``) and over :func:`devices`. Hugging Face cases are skipped when ``transformers`` is
not installed (it is in the ``dev`` extra).

Inputs are a tensor, or for the HF models a ``dict`` of tensors with the batch on the leading axis
(``input_ids``, ``attention_mask``); ``case.forward(model, inputs)`` calls the model either way.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def devices() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when a GPU is present: the same tests check a GPU run."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def logits_of(outputs: Any) -> Tensor:
    """The logits of a plain tensor output or of a Hugging Face ``ModelOutput``."""
    return outputs if isinstance(outputs, Tensor) else outputs.logits


def cross_entropy(outputs: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every target position (``[B]`` class labels or ``[B, T]`` tokens)."""
    z = logits_of(outputs)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------- torchvision-layout ResNet-18
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv-bn-relu-conv-bn plus identity or 1×1 downsample."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, norm: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` (``resnet18`` = ``layers=(2, 2, 2, 2)``), with a width knob:
    ``width=64`` is the real ResNet-18 (11.2 M parameters at 1000 classes)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 width: int = 64, norm: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self._norm = norm
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       self._norm(planes))
        layers: list[nn.Module] = [BasicBlock(self.inplanes, planes, stride, downsample, self._norm)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, norm=self._norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, width)


# ---------------------------------------------------------------- timm-layout ViT
class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.num_patches = (img_size // patch) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's ``Attention``: one fused ``qkv`` Linear, ``F.scaled_dot_product_attention``, ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` layout: model-level ``cls_token`` and ``pos_embed``
    parameters, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
    ``norm``, ``head``; class-token pooling."""

    def __init__(self, img_size: int = 32, patch_size: int = 8, in_chans: int = 3,
                 num_classes: int = 10, embed_dim: int = 32, depth: int = 2, num_heads: int = 4):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * .02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ---------------------------------------------------------------- recurrent, GroupNorm, tied
class RNNClassifier(nn.Module):
    """Embedding → ``nn.LSTM`` / ``nn.GRU`` (batch_first) → Linear on the last hidden state."""

    def __init__(self, cell: str = "lstm", vocab: int = 50, dim: int = 16, hidden: int = 24,
                 num_layers: int = 1, num_classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = rnn(dim, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


class GroupNormCNN(nn.Module):
    def __init__(self, channels: int = 8, groups: int = 4, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.GroupNorm(groups, 2 * channels),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class TorchEncoder(nn.Module):
    """Embedding → ``nn.TransformerEncoder`` (2 pre-norm ``nn.TransformerEncoderLayer``s: torch's
    ``nn.MultiheadAttention``, ReLU feed-forward, LayerNorms) → mean over tokens → Linear."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


class TiedLM(nn.Module):
    """A next-token model whose output projection is the input embedding (``lm_head.weight is
    embed.weight``), as in GPT-2 and most language models."""

    def __init__(self, vocab: int = 40, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm_head(self.norm(torch.tanh(self.mix(self.embed(tokens)))))


# ---------------------------------------------------------------- Hugging Face (tiny configs)
def hf_bert(num_labels: int = 3, vocab: int = 64, layers: int = 2, hidden: int = 32,
            heads: int = 2, **config: Any) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden,
                     max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config)
    return BertForSequenceClassification(cfg)


def hf_gpt2(vocab: int = 64, layers: int = 2, hidden: int = 32, heads: int = 2,
            **config: Any) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config)
    return GPT2LMHeadModel(cfg)


def hf_llama(vocab: int = 64, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
             **config: Any) -> nn.Module:
    """Llama: grouped-query attention (``repeat_kv``), rotary positions, SwiGLU, RMSNorm; untied
    head. RMSNorm and rotary compute in float32 inside a float64 model (see ``ForeignCase.floor``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=64,
                      bos_token_id=vocab - 1, eos_token_id=vocab - 1, **config)
    return LlamaForCausalLM(cfg)


def hf_t5(vocab: int = 64, hidden: int = 32, heads: int = 2, **config: Any) -> nn.Module:
    """T5 (encoder–decoder, relative position bias shared by every sample, RMS-style
    ``T5LayerNorm``, ReLU feed-forward), one layer each side. transformers 5 ties the head to the
    shared embedding whatever ``tie_word_embeddings`` says (``lm_head.weight is shared.weight``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden,
                   num_layers=1, num_heads=heads, dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=0, **config)
    return T5ForConditionalGeneration(cfg)


def hf_t5_frozen_bias(**config: Any) -> nn.Module:
    """:func:`hf_t5` with the relative position bias out of θ (``requires_grad_(False)``): the way
    out a refusal names for a shared layer, under which every function must stay exact."""
    model = hf_t5(**config)
    for name, p in model.named_parameters():
        if "relative_attention_bias" in name:
            p.requires_grad_(False)
    return model


class TokensOnly(nn.Module):
    """A Hugging Face model called with keyword arguments from one batch-first tensor: ``[b, T]``
    token ids, or ``[b, 2, T]`` ids stacked with the attention mask (so code that expects a plain
    ``model(x)`` can take it)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return self.hf(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        return self.hf(input_ids=x).logits


# ---------------------------------------------------------------- the cases
@dataclass(frozen=True)
class ForeignCase:
    """A model builder, a batch builder and the mean-reduced loss for it.

    ``build()`` returns a fresh model (seeded, float32, train mode); ``batch(b, seed)`` returns
    ``(inputs, targets)``; ``loss_fn(outputs, targets)`` is mean-reduced over the batch (and over
    token positions for the language models).

    ``floor``: the least relative tolerance a float64 comparison on this model can ask for. 0 for
    models that compute in the model's dtype throughout. Hugging Face's Llama computes RMSNorm
    and rotary in float32 even in a float64 model, so its outputs carry float32 rounding (eps
    1.2e-7 per operation) that two float64 paths (the batch and the per-sample loop, autograd's
    and a finite difference's) round differently; about 1e-8 is observed, and the floor, 1e-6,
    is ten float32 ulps.
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, int], tuple[Any, Tensor]]
    loss_fn: Callable[[Any, Tensor], Tensor] = cross_entropy
    hf: bool = False
    floor: float = 0.0
    tags: frozenset[str] = field(default_factory=frozenset)

    def model(self, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().to(device=device, dtype=dtype)

    def data(self, b: int = 4, seed: int = 0, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> tuple[Any, Tensor]:
        inputs, targets = self.batch(b, seed)
        return to(inputs, device, dtype), targets.to(device)

    @staticmethod
    def forward(model: nn.Module, inputs: Any) -> Any:
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def to(inputs: Any, device: str, dtype: torch.dtype) -> Any:
    """Move a tensor or a dict of tensors; only floating tensors change dtype."""
    if isinstance(inputs, dict):
        return {k: to(v, device, dtype) for k, v in inputs.items()}
    return inputs.to(device=device, dtype=dtype if inputs.is_floating_point() else inputs.dtype)


def _images(b: int, seed: int, classes: int = 10, size: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, classes, (b,), generator=g)


def _tokens(b: int, seed: int, vocab: int, t: int, classes: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, classes, (b,), generator=g)


def _lm_tokens(b: int, seed: int, vocab: int, t: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (b, t + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _hf_cls_batch(b: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    ids, labels = _tokens(b, seed, 64, 10, 3)
    mask = torch.ones_like(ids)
    mask[: b // 2, 7:] = 0  # padded sequences: the mask is data-dependent Python in HF code
    return {"input_ids": ids, "attention_mask": mask}, labels


def _hf_seq2seq_batch(b: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """Source of 6 tokens (the last two of the first half padded), target of 5: neither length
    is the suite's batch size, so T5's batch-less bias is refused by its leading size."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, 64, (b, 6), generator=g)
    mask = torch.ones_like(src)
    mask[: b // 2, 4:] = 0
    tgt = torch.randint(1, 64, (b, 6), generator=g)
    return {"input_ids": src, "attention_mask": mask, "decoder_input_ids": tgt[:, :-1]}, tgt[:, 1:]


def _hf_lm_batch(b: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    ids, targets = _lm_tokens(b, seed, 64, 10)
    return {"input_ids": ids}, targets


CASES: list[ForeignCase] = [
    ForeignCase("resnet18", lambda: resnet18(width=8), _images, tags=frozenset({"batchnorm", "conv"})),
    ForeignCase("vit", VisionTransformer, _images, tags=frozenset({"sdpa", "fused_qkv", "layernorm",
                                                                  "toplevel_params"})),
    ForeignCase("bert", hf_bert, _hf_cls_batch, hf=True, tags=frozenset({"sdpa", "layernorm", "hf"})),
    ForeignCase("gpt2", hf_gpt2, _hf_lm_batch, hf=True,
                tags=frozenset({"sdpa", "layernorm", "hf", "conv1d", "tied"})),
    ForeignCase("lstm", lambda: RNNClassifier("lstm"), lambda b, s: _tokens(b, s, 50, 7, 5),
                tags=frozenset({"rnn"})),
    ForeignCase("gru", lambda: RNNClassifier("gru"), lambda b, s: _tokens(b, s, 50, 7, 5),
                tags=frozenset({"rnn"})),
    ForeignCase("groupnorm_cnn", GroupNormCNN, lambda b, s: _images(b, s, size=16),
                tags=frozenset({"groupnorm", "conv"})),
    ForeignCase("llama", hf_llama, _hf_lm_batch, hf=True, floor=1e-6,
                tags=frozenset({"sdpa", "rmsnorm", "hf", "gqa", "rotary"})),
    ForeignCase("t5", hf_t5, _hf_seq2seq_batch, hf=True, floor=1e-6,
                tags=frozenset({"sdpa", "rmsnorm", "hf", "seq2seq", "shared_bias"})),
    ForeignCase("t5_frozen_bias", hf_t5_frozen_bias, _hf_seq2seq_batch, hf=True, floor=1e-6,
                tags=frozenset({"sdpa", "rmsnorm", "hf", "seq2seq"})),
    ForeignCase("tied_lm", TiedLM, lambda b, s: _lm_tokens(b, s, 40, 6), tags=frozenset({"tied"})),
    ForeignCase("torch_encoder", TorchEncoder, lambda b, s: _tokens(b, s, 50, 7, 5),
                tags=frozenset({"sdpa", "mha", "layernorm"})),
]
CASE_IDS = [c.name for c in CASES]


def case(name: str) -> ForeignCase:
    """The case called ``name``."""
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"no foreign case {name!r}; known: {CASE_IDS}")


def skip_unavailable(c: ForeignCase) -> None:
    """Skip the calling test when the case needs ``transformers`` and it is not installed."""
    if c.hf and not HAS_TRANSFORMERS:
        import pytest

        pytest.skip("transformers is not installed (dev extra)")
