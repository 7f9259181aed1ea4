"""Built-in experiments. Importing this package registers them (see ``base.register``)."""
from neurothermo.experiments import (
    entropic_flow,
    layer_balance,
    platonic_linear,
    platonic_nonlinear,
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

__all__ = [
    "REGISTRY",
    "Experiment",
    "MissingExtra",
    "Prediction",
    "RunContext",
    "all_experiments",
    "get_experiment",
    "register",
]
