"""Symmetries found automatically, verified numerically (exact or approximate), with their
Noether charges; docs/symmetries.md describes the kinds, graph capture and approximate ones."""
from neurothermo.symmetry import permutation, rescale, rotation, scale, sign_flip
from neurothermo.symmetry.base import ParamSlice, Symmetry
from neurothermo.symmetry.capture import Block
from neurothermo.symmetry.checking import Rejection
from neurothermo.symmetry.detect import SymmetryReport, find_symmetries
from neurothermo.symmetry.equilibrium import ChargeEquilibrium, charge_equilibrium
from neurothermo.symmetry.trace import UntraceableModelError
from neurothermo.symmetry.verify import verify_symmetry

__all__ = [
    "Block", "ChargeEquilibrium", "ParamSlice", "Rejection", "Symmetry", "SymmetryReport",
    "UntraceableModelError", "charge_equilibrium", "find_symmetries", "verify_symmetry",
]
