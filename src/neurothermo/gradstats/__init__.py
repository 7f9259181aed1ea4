"""Per-sample gradient statistics at the cost of one backward pass (docs/theory.md §1).

``per_sample_grad_norms`` gives ``‖∇_θ l_i‖²`` for every sample of a batch, exactly, from one
forward and one backward; ``gradient_noise`` turns them into ``Tr Σ`` with its standard error.
Layer coverage is extended with ``register_rule`` (one small file per layer kind in ``rules/``).
``BackwardCapture`` reads the same norms from a training loop's own forward and backward instead.
"""
from neurothermo.gradstats._layout import LayoutWarning
from neurothermo.gradstats.noise import GradientNoise, gradient_noise
from neurothermo.gradstats.norms import per_sample_grad_norms
from neurothermo.gradstats.passive import BackwardCapture
from neurothermo.gradstats.rules import (
    FallbackWarning,
    PerSampleUnsupportedError,
    Rule,
    register_rule,
)

__all__ = [
    "BackwardCapture",
    "FallbackWarning",
    "GradientNoise",
    "LayoutWarning",
    "PerSampleUnsupportedError",
    "Rule",
    "gradient_noise",
    "per_sample_grad_norms",
    "register_rule",
]
