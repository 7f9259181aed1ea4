"""Type aliases shared by the measuring API (defined once; the choices of each ``Literal`` are
also what the functions validate at run time, via ``typing.get_args``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeAlias

from torch import Tensor

__all__ = ["EigenMethod", "GramMethod", "HvpMethod", "LossFn", "Mode", "TraceMethod"]

#: ``loss_fn(outputs, targets) -> scalar``, mean-reduced over the batch; ``None``: the model
#: returns its own mean loss (``model_loss``).
LossFn: TypeAlias = Callable[..., Tensor] | None
#: The train/eval flags a measurement runs in: ``None`` keeps the model's current flags.
Mode: TypeAlias = Literal["train", "eval"] | None
#: How a Hessian-vector product is computed.
HvpMethod: TypeAlias = Literal["reverse", "forward_over_reverse", "finite_difference"]
#: Stochastic trace estimators.
TraceMethod: TypeAlias = Literal["hutchinson", "hutch++"]
#: Top-eigenvalue solvers.
EigenMethod: TypeAlias = Literal["lanczos", "power"]
#: Gram-matrix (kernel) alignment measures.
GramMethod: TypeAlias = Literal["cosine", "pearson_offdiag"]
