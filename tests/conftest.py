"""Shared fixtures: temporary experiments registered for a single test."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import matplotlib
import pytest

matplotlib.use("Agg")


@pytest.fixture
def temp_experiment() -> Iterator[Callable[..., object]]:
    """Register throw-away experiments for one test and remove them afterwards."""
    from neurothermo.config import setting
    from neurothermo.experiments.base import REGISTRY, Experiment, get_experiment, register

    get_experiment("entropic-flow")  # make sure the built-ins are registered first
    added: list[str] = []

    @dataclass(frozen=True)
    class ToyConfig:
        steps: int = setting(5, "number of steps", min=1, max=1000)
        scale: float = setting(1.0, "a positive scale", min=0.0)

    def make(name: str, run: Callable[..., None], **kw: object) -> Experiment:
        exp = register(Experiment(name=name, title=f"toy {name}", config=ToyConfig,
                                  quick=ToyConfig(steps=3), full=ToyConfig(), run=run, **kw))
        added.append(name)
        return exp

    yield make
    for name in added:
        REGISTRY.pop(name, None)
