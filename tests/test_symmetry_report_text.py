"""The printed report and ``SymmetryReport.changes`` agree on what each number of an approximate
symmetry is: ``changes`` holds the verified change with every eps → 0, ``Symmetry.breaking`` the
breaking at the model's eps; the text names both as such."""
from __future__ import annotations

import torch
from torch import nn

import neurothermo as nt

D = torch.float64


def test_approximate_symmetry_text_names_both_figures() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, eps=1e-5), nn.Linear(6, 2)).to(D)
    report = nt.find_symmetries(model, torch.randn(8, 4, dtype=D), explain=True, progress=False)
    (i, sc), = [(i, s) for i, s in enumerate(report) if not s.exact]
    change = report.changes[i]
    assert change < 1e-12 < sc.breaking < 1e-3  # eps → 0 figure vs breaking at eps
    line = next(ln for ln in str(report).splitlines() if ln.strip().startswith("scale"))
    assert f"breaking {sc.breaking:.1e} at the model's eps" in line
    assert f"[max output change {change:.1e} with eps → 0]" in line
    exact = [ln for ln in str(report).splitlines() if ln.strip().startswith("permutation")]
    assert exact and all("with eps → 0" not in ln for ln in exact)
