"""Per-sample gradient rules, one small file per layer kind, behind one registry.

``register_rule(module_type, Rule(pieces, forward=None))`` is the extension point (see
``_base.py``). Modules without a rule use the exact torch.func fallback (``fallback.py``).
"""
from neurothermo.gradstats.rules import (
    attention,
    conv,
    embedding,
    hf_conv1d,
    hf_rms_norm,
    linear,
    norms,
    recurrent,
)
from neurothermo.gradstats.rules._base import (
    Call,
    PerSampleUnsupportedError,
    Rule,
    Sink,
    Use,
    register_named_rule,
    register_rule,
    rule_for,
)
from neurothermo.gradstats.rules.fallback import FallbackWarning, fallback_pieces
from neurothermo.gradstats.rules.norms import check_batchnorm

__all__ = [
    "Call",
    "FallbackWarning",
    "PerSampleUnsupportedError",
    "Rule",
    "Sink",
    "Use",
    "attention",
    "check_batchnorm",
    "conv",
    "embedding",
    "fallback_pieces",
    "hf_conv1d",
    "hf_rms_norm",
    "linear",
    "norms",
    "recurrent",
    "register_named_rule",
    "register_rule",
    "rule_for",
]
