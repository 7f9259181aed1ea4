"""The entropic engine (docs/theory.md §1): entropic loss, force, expected decomposition, flow.

Model-level functions take ``(model, loss_fn, batch_or_data, *, lr, ...)`` with a mean-reduced
``loss_fn``; the functional core takes ``f(params) -> scalar`` and a tensor / sequence / dict of
parameters. ``weight_decay`` is torch's ``wd`` (penalty ``(wd/2)‖θ‖²``, the paper's ``γ = wd/2``).
"""
from neurothermo.entropic.decomposition import (
    EntropicDecomposition,
    ExpectedEntropicForce,
    entropic_decomposition,
    expected_entropic_force,
)
from neurothermo.entropic.flow import entropic_flow, functional_flow
from neurothermo.entropic.force import entropic_force, functional_entropic_force
from neurothermo.entropic.loss import entropic_loss, functional_entropic_loss
from neurothermo.entropic.preconditioner import Preconditioner, preconditioner_from
from neurothermo.entropic.regularizer import EntropicRegularizer

__all__ = [
    "EntropicDecomposition",
    "EntropicRegularizer",
    "ExpectedEntropicForce",
    "Preconditioner",
    "entropic_decomposition",
    "entropic_flow",
    "entropic_force",
    "entropic_loss",
    "expected_entropic_force",
    "functional_entropic_force",
    "functional_entropic_loss",
    "functional_flow",
    "preconditioner_from",
]
