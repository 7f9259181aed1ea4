"""Shared fixtures: temporary experiments registered for a single test."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The test models are tiny: a second intra-op thread only adds synchronisation, and on a shared
# 2-core machine it makes them 10–30× slower. Results never depend on the thread count here.
_one_thread = pytest.fixture(autouse=True, scope="session")(_single_thread)
one_thread = pytest.fixture(_single_thread)  # requested explicitly by a few tests; a no-op now


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
