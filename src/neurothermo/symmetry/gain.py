"""Per-unit gains traced as arithmetic: ``y = w ⊙ x`` with a parameter ``w`` of shape ``[d]``.

Hugging Face's RMSNorm (``LlamaRMSNorm``: ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(dtype)``;
T5's ``T5LayerNorm`` likewise) is not a torch module: the trace sees the normalisation's
arithmetic and then an elementwise multiplication of the last axis by ``weight``. That
multiplication is a producer of ``d`` units read like a LayerNorm's affine (``diag``: it scales
its units and does not mix them), so the same rules decide what it admits: with Linear
consumers only, ``w_i → α_i·w_i`` and the consumers' input columns ``÷ α_i`` leave the function
unchanged (``rescale``); a residual add across the units or a nonlinearity that is not
positively homogeneous blocks it. Gemma's ``(1 + w) ⊙ x̂`` is not matched: its factor is
``1 + w``, not a parameter, and scaling ``w`` does not scale it.
"""
from __future__ import annotations

import torch.fx as fx

from neurothermo.symmetry.base import ParamSlice
from neurothermo.symmetry.trace import Traced, op_name
from neurothermo.symmetry.units import Producer, Track


def gain_producer(tr: Traced, node: fx.Node, shape: tuple[int, ...]) -> Producer | None:
    """``mul(w, x)`` / ``mul(x, w)``: ``w`` a ``[d]`` parameter over ``x``'s last axis (``d``)."""
    if op_name(node) != "mul" or len(node.args) != 2 or node.kwargs:
        return None
    d = shape[-1]
    for w, x in (node.args, node.args[::-1]):
        attr = tr.attr(w)
        if attr is None or attr[0] != "param":
            continue
        xs = tr.shape(x) if isinstance(x, fx.Node) else None
        if tr.shape(w) != (d,) or not xs or xs[-1] != d or tr.attr(x) is not None:
            return None
        return Producer(node, attr[1].removesuffix(".weight"), d, Track((len(shape) - 1,)),
                        [ParamSlice(attr[1], "in", 0)], diag=True)
    return None
