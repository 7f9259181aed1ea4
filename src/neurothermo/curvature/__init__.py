"""Curvature of the mean loss over a fixed data set: Hessian-vector products, top eigenvalues
(block Lanczos or power iteration), trace (Hutchinson, Hutch++) and sharpness tracking.

Convention everywhere: ``H = ∇²_θ L``, ``L = (1/N) Σ_i l_i`` over all N samples of ``data``
(``loss_fn`` mean-reduced, microbatches weighted by size); see ``hvp.py``.
"""
from neurothermo.curvature.eigen import EigenResult, top_eigenvalues
from neurothermo.curvature.hvp import HessianOperator, hessian_operator, hvp
from neurothermo.curvature.lanczos import ConvergenceWarning, RitzResult, lanczos
from neurothermo.curvature.operator import (
    CongruenceOperator,
    DenseOperator,
    FunctionOperator,
    LinearOperator,
    ParamSpace,
)
from neurothermo.curvature.power import power_iteration
from neurothermo.curvature.trace import TraceResult, hessian_trace, hutchinson, hutchpp
from neurothermo.curvature.tracker import SharpnessReading, SharpnessTracker

__all__ = [
    "CongruenceOperator",
    "ConvergenceWarning",
    "DenseOperator",
    "EigenResult",
    "FunctionOperator",
    "HessianOperator",
    "LinearOperator",
    "ParamSpace",
    "RitzResult",
    "SharpnessReading",
    "SharpnessTracker",
    "TraceResult",
    "hessian_operator",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "hvp",
    "lanczos",
    "power_iteration",
    "top_eigenvalues",
]
