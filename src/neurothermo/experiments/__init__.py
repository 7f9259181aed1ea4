"""The experiment framework and the built-in experiments (importing this package registers them).

Framework: :class:`Experiment`, :func:`register`, :class:`RunContext`, :class:`Prediction`,
:func:`setting` / :class:`ConfigError` (settings), :func:`run_experiment` (run one into a run
folder). The measuring API (``import neurothermo``) never imports this package.
"""
from neurothermo.config import ConfigError, setting
from neurothermo.experiments import (
    entropic_flow,
    layer_balance,
    platonic_linear,
    pretrained_platonic,
    rescale_equilibrium,
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
from neurothermo.runner import ExperimentFailed, RunResult, run_experiment

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
