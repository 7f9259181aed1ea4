# ruff: noqa: I001  (imports are grouped by feature below, not sorted)
"""neurothermo: the thermodynamics of neural-network training, measured.

The measuring API, and only that: importing it loads no experiment, plot or command-line code
(those live in :mod:`neurothermo.experiments` and :mod:`neurothermo.cli`).

Conventions: ``loss_fn(outputs, targets)`` is mean-reduced over the batch,
``l_B = (1/b) Σ_i l_i``; ``lr`` is η; ``weight_decay`` is torch's ``wd`` (penalty ``(wd/2)‖θ‖²``,
the paper's ``γ = wd/2``); batch size ``b``, dataset size ``N`` (docs/conventions.md).
"""
from neurothermo._version import __version__
from neurothermo.seeding import seed_everything
from neurothermo._data import model_loss  # the data model: docs/data.md

# --- gradstats (issue 4) ---
from neurothermo.gradstats import (
    BackwardCapture,
    GradientNoise,
    PerSampleUnsupportedError,
    gradient_noise,
    per_sample_grad_norms,
)
# --- end gradstats ---

# --- entropic (issue 3) ---
from neurothermo.entropic import (
    EntropicDecomposition,
    EntropicRegularizer,
    ExpectedEntropicForce,
    Preconditioner,
    entropic_decomposition,
    entropic_flow,
    entropic_force,
    entropic_loss,
    expected_entropic_force,
    functional_entropic_force,
    functional_entropic_loss,
    functional_flow,
    preconditioner_from,
)
# --- end entropic ---

# --- curvature (issue 7) ---
from neurothermo.curvature import (
    ConvergenceWarning,
    EigenResult,
    SharpnessReading,
    SharpnessTracker,
    TraceResult,
    hessian_trace,
    hvp,
    top_eigenvalues,
)
# --- end curvature ---

# --- symmetry (issue 5) ---
from neurothermo.symmetry import (
    ChargeEquilibrium,
    Rejection,
    Symmetry,
    SymmetryReport,
    UntraceableModelError,
    charge_equilibrium,
    find_symmetries,
    verify_symmetry,
)
# --- end symmetry ---

# --- train / monitor (issue 6) ---
from neurothermo.monitor import (
    ChargeDrift,
    History,
    JSONLWriter,
    LayerBalance,
    MonitorWarning,
    NeuronBalance,
    TensorBoardWriter,
    ThermoMonitor,
    charge_drift,
    layer_balance,
    neuron_balance,
)
from neurothermo.train import TrainingDiverged, train
# --- end train / monitor ---

# --- alignment (issue 8) ---
from neurothermo import alignment
# --- end alignment ---


__all__ = [
    "BackwardCapture",
    "ChargeDrift",
    "ChargeEquilibrium",
    "ConvergenceWarning",
    "EigenResult",
    "EntropicDecomposition",
    "EntropicRegularizer",
    "ExpectedEntropicForce",
    "GradientNoise",
    "History",
    "JSONLWriter",
    "LayerBalance",
    "MonitorWarning",
    "NeuronBalance",
    "PerSampleUnsupportedError",
    "Preconditioner",
    "Rejection",
    "SharpnessReading",
    "SharpnessTracker",
    "Symmetry",
    "SymmetryReport",
    "TensorBoardWriter",
    "ThermoMonitor",
    "TraceResult",
    "TrainingDiverged",
    "UntraceableModelError",
    "__version__",
    "alignment",
    "charge_drift",
    "charge_equilibrium",
    "entropic_decomposition",
    "entropic_flow",
    "entropic_force",
    "entropic_loss",
    "expected_entropic_force",
    "find_symmetries",
    "functional_entropic_force",
    "functional_entropic_loss",
    "functional_flow",
    "gradient_noise",
    "hessian_trace",
    "hvp",
    "layer_balance",
    "model_loss",
    "neuron_balance",
    "per_sample_grad_norms",
    "preconditioner_from",
    "seed_everything",
    "top_eigenvalues",
    "train",
    "verify_symmetry",
]
