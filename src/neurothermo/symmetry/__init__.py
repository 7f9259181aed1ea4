"""Symmetries found automatically, verified numerically, with their Noether charges (THEORY.md §2)."""
from neurothermo.symmetry import permutation, rescale, rotation, scale, sign_flip
from neurothermo.symmetry.base import ParamSlice, Symmetry
from neurothermo.symmetry.detect import Rejection, SymmetryReport, find_symmetries
from neurothermo.symmetry.equilibrium import ChargeEquilibrium, charge_equilibrium
from neurothermo.symmetry.trace import UntraceableModelError
from neurothermo.symmetry.verify import verify_symmetry

__all__ = [
    "ChargeEquilibrium", "ParamSlice", "Rejection", "Symmetry", "SymmetryReport",
    "UntraceableModelError", "charge_equilibrium", "find_symmetries", "verify_symmetry",
]
