"""Model builders used by the experiments (small, explicit, easy to trace)."""
from neurothermo.models.linear import DeepLinear, EmbeddedDeepLinear
from neurothermo.models.mlp import mlp

__all__ = ["DeepLinear", "EmbeddedDeepLinear", "mlp"]
