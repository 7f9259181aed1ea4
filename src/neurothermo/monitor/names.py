"""Column names written by :class:`~neurothermo.monitor.ThermoMonitor` and read by the summaries.

Layers are the modules that own parameters directly, named as in ``model.named_modules()`` and
listed in registration order in ``history.meta["layers"]``. Symmetries are numbered in the order
of ``history.meta["symmetries"]`` (each entry has ``kind``, ``location``, ``units``, ``params``).
"""
from __future__ import annotations

LOSS = "loss"
LR = "lr"
BATCH_SIZE = "batch_size"
TEMPERATURE = "temperature"  # lr / b
SHARPNESS = "sharpness"  # λ_max of the Hessian on the monitor's fixed data
LR_SHARPNESS = "lr_sharpness"  # lr · λ_max (2 is the stability edge of GD)
ENTROPIC = ("entropic/loss", "entropic/discretization", "entropic/noise", "entropic/trace_sigma")


def grad_sq(layer: str) -> str:
    """‖g_layer‖² of the minibatch gradient (all parameters owned by the layer)."""
    return f"grad_sq/{layer}"


def grad_sq_ema(layer: str) -> str:
    """Bias-corrected exponential moving average of :func:`grad_sq` (the running expectation)."""
    return f"grad_sq_ema/{layer}"


def weight_norm(layer: str) -> str:
    return f"weight_norm/{layer}"


def layer_ratio(a: str, b: str) -> str:
    """EMA‖g_a‖² / EMA‖g_b‖² for consecutive layers a, b."""
    return f"layer_ratio/{a}:{b}"


def layer_residual(a: str, b: str) -> str:
    """(EMA_a − EMA_b) / (EMA_a + EMA_b)."""
    return f"layer_residual/{a}:{b}"


def sym(i: int) -> str:
    return f"sym{i}"


def energy_in(i: int) -> str:
    """Per hidden unit of rescale symmetry i: ‖g_{w_u}‖² + g_{b_u}² (incoming weights and bias)."""
    return f"energy_in/{sym(i)}"


def energy_out(i: int) -> str:
    """Per hidden unit of rescale symmetry i: ‖g_{u_u}‖² (outgoing weights)."""
    return f"energy_out/{sym(i)}"


def neuron_ratio(i: int) -> str:
    """Σ_u EMA in-energy / Σ_u EMA out-energy (the layer-level balance of the symmetric pair)."""
    return f"neuron_ratio/{sym(i)}"


def neuron_residual(i: int) -> str:
    """Σ_u |EMA_in − EMA_out| / Σ_u (EMA_in + EMA_out): 0 at neuron balance."""
    return f"neuron_residual/{sym(i)}"


def charge(i: int) -> str:
    """The charge J before the step (vector per unit, matrix, or scalar)."""
    return f"charge/{sym(i)}"


def charge_pred(i: int) -> str:
    """Predicted change of J over the step: ((1 − lr·wd)² − 1)·J + lr²·gᵀAg (plain SGD only)."""
    return f"charge_pred/{sym(i)}"


def charge_meas(i: int) -> str:
    """Measured change of J over the step (J after the optimizer step minus J before)."""
    return f"charge_meas/{sym(i)}"


def charge_err(i: int) -> str:
    """max |measured − predicted| over the charge's entries."""
    return f"charge_err/{sym(i)}"
