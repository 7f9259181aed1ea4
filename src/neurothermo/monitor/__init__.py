"""Thermodynamic monitoring of training: ThermoMonitor, its History, balance summaries, writers.

``ThermoMonitor`` (monitor.py) records, from what backward produced, per-layer and per-unit
gradient energies, symmetry charges with their predicted and measured changes, the temperature,
and occasionally the entropic terms and sharpness; ``History`` (history.py) is its columnar table;
``layer_balance`` / ``neuron_balance`` (balance.py) summarise the paper's Figure 2 quantities;
``charge_drift`` (drift.py) checks that a window's mean imbalance is its charge's drift, exactly;
writers.py streams rows to JSON lines, TensorBoard, W&B or MLflow; lightning.py and hf.py adapt it to
PyTorch Lightning and the Hugging Face Trainer (optional); distributed.py reduces across ranks
(DDP, FSDP2). Column names: :mod:`neurothermo.monitor.names`.
"""
from neurothermo.monitor.balance import LayerBalance, NeuronBalance, layer_balance, neuron_balance
from neurothermo.monitor.drift import ChargeDrift, charge_drift
from neurothermo.monitor.history import History
from neurothermo.monitor.monitor import MonitorWarning, ThermoMonitor
from neurothermo.monitor.writers import (
    JSONLWriter,
    MLflowWriter,
    TensorBoardWriter,
    WandbWriter,
    Writer,
)

__all__ = [
    "ChargeDrift",
    "History",
    "JSONLWriter",
    "LayerBalance",
    "MLflowWriter",
    "MonitorWarning",
    "NeuronBalance",
    "TensorBoardWriter",
    "ThermoMonitor",
    "WandbWriter",
    "Writer",
    "charge_drift",
    "layer_balance",
    "neuron_balance",
]
