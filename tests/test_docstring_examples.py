"""Every ``>>>`` example in the package's docstrings runs and prints what it says (doctest).

Modules whose optional dependency is not installed (the Lightning callback without lightning) are
reported as skipped, by name; everything else is imported and its examples executed.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import neurothermo

MODULES = sorted(m.name for m in pkgutil.walk_packages(neurothermo.__path__, "neurothermo."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples(name: str) -> list[doctest.DocTest]:
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # an optional extra (lightning, tensorboard) that is not installed
        if e.name and not e.name.startswith("neurothermo"):
            pytest.skip(f"{name} needs {e.name}")
        raise
    return [t for t in doctest.DocTestFinder().find(module, name) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    tests = _examples(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    torch.manual_seed(0)
    for t in tests:
        runner.run(t)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} docstring examples in {name} failed (output above)"


def test_the_public_api_has_examples() -> None:
    # every function and class exported from the package root carries a runnable example, except
    # those listed here (exceptions and warnings, and records returned by the functions, whose
    # use is shown in the example of the function that returns them)
    without = {
        # exceptions and warnings
        "ConvergenceWarning", "MonitorWarning", "TrainingDiverged", "UntraceableModelError",
        # frozen result records, shown in the examples of the functions that return them
        "ChargeDrift", "ChargeEquilibrium", "EigenResult", "EntropicDecomposition",
        "ExpectedEntropicForce", "GradientNoise", "LayerBalance", "NeuronBalance",
        "SharpnessReading", "Symmetry", "SymmetryReport", "TraceResult", "Rejection",
    }
    lacking = []
    for name in neurothermo.__all__:
        obj = getattr(neurothermo, name)
        if name.startswith("_") or not callable(obj) or name in without:
            continue
        if ">>>" not in (obj.__doc__ or ""):
            lacking.append(name)
    assert lacking == [], f"no >>> example in the docstring of: {lacking}"
