"""The experiment framework and the built-in experiments (importing this package registers them).

Framework: :class:`Experiment`, :func:`register`, :class:`RunContext`, :class:`Prediction`,
:func:`setting` / :class:`ConfigError` (settings), :func:`run_experiment` (run one into a run
folder). The measuring API (``import neurothermo``) never imports this package.
"""
from typing import TYPE_CHECKING

from neurothermo.config import ConfigError, setting
from neurothermo.experiments import (
    discrete_symmetry,
    entropic_flow,
    forward_backward,
    gpt_balance,
    layer_balance,
    matrix_lr,
    momentum,
    noise_term,
    platonic_linear,
    platonic_nonlinear,
    pretrained_platonic,
    rescale_equilibrium,
    scale_invariance,
    sgd_vs_entropic_flow,
    sharpness_phase,
    transformer_alignment,
)

# (one import line per experiment module; keep sorted)
from neurothermo.experiments.base import (
    REGISTRY,
    Experiment,
    MissingExtra,
    Prediction,
    RunContext,
    all_experiments,
    get_experiment,
    register,
)

if TYPE_CHECKING:  # for type checkers; at run time they come from __getattr__ below
    from neurothermo.runner import ExperimentFailed, RunResult, run_experiment

_RUNNER = ("ExperimentFailed", "RunResult", "run_experiment")


def __getattr__(name: str) -> object:
    # neurothermo.runner imports this package (for the registry): re-export it lazily, so that
    # importing either module first works.
    if name in _RUNNER:
        from neurothermo import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REGISTRY",
    "ConfigError",
    "Experiment",
    "ExperimentFailed",
    "MissingExtra",
    "Prediction",
    "RunContext",
    "RunResult",
    "all_experiments",
    "get_experiment",
    "register",
    "run_experiment",
    "setting",
]
