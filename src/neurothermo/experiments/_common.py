"""Pieces several experiments share: the headless pyplot, a log-log slope fit, a docstring crawl."""
from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures only go to files).

    matplotlib is imported here, not at module import, so that listing or configuring experiments
    does not pay for it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loglog_slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of log y on log x, and its standard error.

    Fit ``log y = s·log x + c``; ``se = sqrt(RSS / (n − 2) / Σ(log x − mean)²)`` (``n − 2`` floored
    at 1, so two points give a zero-residual fit with se 0).
    """
    lx, ly = np.log(x), np.log(y)
    A = np.stack([lx, np.ones_like(lx)], axis=1)
    coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
    dof = max(len(x) - 2, 1)
    resid = ly - A @ coef
    s2 = float(resid @ resid) / dof
    se = math.sqrt(s2 / float(((lx - lx.mean()) ** 2).sum()))
    return float(coef[0]), se


def public_objects(modules: Iterable[str], *, include_modules: bool = False) -> Iterator[Any]:
    """Import each module in order and yield its public attributes (``sorted(dir(module))``, names
    not starting with ``_``; ``None`` for one that cannot be read), the module itself first when
    ``include_modules``. Warnings (deprecated attributes) are silenced while this runs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod_name in modules:
            mod = importlib.import_module(mod_name)
            if include_modules:
                yield mod
            for name in sorted(dir(mod)):
                if not name.startswith("_"):
                    yield getattr(mod, name, None)
