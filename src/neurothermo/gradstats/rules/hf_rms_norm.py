"""Hugging Face's RMSNorm layers: ``y = w ⊙ x̂(x)``, ``c_i(w) = Σ_positions δ_i ⊙ x̂_i``.

Transformers defines RMSNorm once per model family (``LlamaRMSNorm``, ``MistralRMSNorm``,
``Qwen2RMSNorm`` … about 150 classes in transformers 5, and ``T5LayerNorm``), each a copy of one of
a few forwards. Their ``x̂`` is computed in float32 whatever the model's dtype, so it is not
``torch.nn.functional.rms_norm`` of the input; the rule recomputes it the way the layer does.

A class is covered when the source of its ``forward`` is, up to comments and whitespace, one of
the forms below (read once per class with ``inspect``): a copy that computes anything else, in
this or another transformers version, is not matched and goes through the exact torch.func
fallback. Forms (``h = x`` in float32, ``r = rsqrt(mean(h², -1) + eps)``):

* Llama: ``w * (h r).to(x.dtype)``, so ``x̂ = (h r).to(x.dtype)``;
* Olmo2: ``(w * h r).to(x.dtype)``, so ``x̂ = h r`` in the dtype ``w * h`` has;
* T5: ``w * (x r)``, ``x r`` cast to ``w.dtype`` when that is float16 or bfloat16.

Each ``x̂`` is then exactly what multiplies ``w`` in the layer's forward, so the per-sample
gradients are those of autograd, to the last bit of the product.
"""
from __future__ import annotations

import inspect
import io
import tokenize

import torch
from torch import Tensor, nn

from neurothermo.gradstats._pieces import Dense, Piece
from neurothermo.gradstats.rules._base import (
    Call,
    Rule,
    batch_first,
    batch_rows,
    register_matcher,
)

_H = ("input_dtype = hidden_states.dtype hidden_states = hidden_states.to(torch.float32) "
      "variance = hidden_states.pow(2).mean(-1, keepdim=True) hidden_states = hidden_states * "
      "torch.rsqrt(variance + self.variance_epsilon) ")
_FORMS = {
    _H + "return self.weight * hidden_states.to(input_dtype)": "llama",
    _H + "return (self.weight * hidden_states).to(input_dtype)": "olmo2",
    ("variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True) hidden_states = "
     "hidden_states * torch.rsqrt(variance + self.variance_epsilon) if self.weight.dtype in "
     "[torch.float16, torch.bfloat16]: hidden_states = hidden_states.to(self.weight.dtype) "
     "return self.weight * hidden_states"): "t5",
}


def forward_form(cls: type[nn.Module]) -> str | None:
    """The form (``"llama"``, ``"olmo2"``, ``"t5"``) of ``cls.forward``'s source, or None."""
    if not cls.__module__.startswith("transformers."):
        return None
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    toks = [t for t in tokenize.generate_tokens(io.StringIO(inspect.cleandoc(src)).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT, tokenize.ENDMARKER)]
    text = " ".join(t.string for t in toks)
    head = text.find(":", text.find(")"))  # the end of the def line (no default holds a ')')
    if not text.startswith("def forward ( self , hidden_states") or head < 0:
        return None
    body = text[head + 1:].strip()
    for form, name in _FORMS.items():
        if body == " ".join(t.string for t in tokenize.generate_tokens(
                io.StringIO(form).readline) if t.string.strip()):
            return name
    return None


def _xhat(m: nn.Module, form: str, x: Tensor) -> Tensor:
    eps = float(m.variance_epsilon)  # type: ignore[arg-type]  # _applies checked it
    w = m.weight
    assert isinstance(w, Tensor)
    if form == "t5":
        h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
        return h.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) else h
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if form == "llama":
        return h.to(x.dtype)
    return h.to(torch.promote_types(w.dtype, h.dtype))  # olmo2: the dtype of w * h


def _rule(form: str) -> Rule:
    def pieces(call: Call, deltas: list[Tensor | None]) -> list[Piece]:
        w, delta = call.param("weight"), deltas[0]
        if w is None or delta is None:
            return []
        b = call.batch_size
        x = call.input(0)
        rows = batch_rows(call.name, x, b)  # 1, or m for a sample-major fold
        batch_first(call.name, delta, b * rows, "output gradient")
        g = (delta * _xhat(call.module, form, x)).reshape(b, -1, *w.shape).sum(1)
        return [Piece(w, Dense(g.to(w.dtype)))]

    return Rule(pieces, applies=_applies)


def _applies(m: nn.Module) -> bool:
    """The instance has the one parameter ``weight`` and the ``variance_epsilon`` the forms read."""
    own = [n for n, _ in m.named_parameters(recurse=False)]
    return own == ["weight"] and isinstance(getattr(m, "variance_epsilon", None), float | int)


_BY_FORM = {name: _rule(name) for name in set(_FORMS.values())}


def _match(cls: type[nn.Module]) -> Rule | None:
    form = forward_form(cls)
    return None if form is None else _BY_FORM[form]


register_matcher(_match)
