from __future__ import annotations

import torch
import torch.nn.functional as F

import neurothermo as nt
from neurothermo.experiments.discrete_symmetry import transformed
from neurothermo.models import mlp
from neurothermo.runner import run_experiment


def test_the_transforms_keep_every_per_sample_loss() -> None:
    """Each group element (isometric or not) leaves the function, hence every per-sample loss, as is."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(3, (8,))
    for act, kind in (("relu", "permutation"), ("tanh", "sign_flip"), ("relu", "rescale")):
        model = mlp([6, 5, 3], act).double()
        syms = [s for s in nt.find_symmetries(model, x[:2]) if s.kind == kind]
        new = transformed(model, syms, [s.random_element(torch.Generator().manual_seed(1)) for s in syms])
        ref = F.cross_entropy(model(x), y, reduction="none")
        assert torch.allclose(F.cross_entropy(new(x), y, reduction="none"), ref, rtol=0, atol=1e-13)


def test_quick_run_and_a_control_that_must_fail(tmp_path) -> None:
    res = run_experiment("discrete-symmetry", quick=True, out=tmp_path,
                         overrides=["steps=80", "hidden=8,8", "n_data=128"])
    preds = {p["name"]: p for p in res.summary["predictions"]}
    assert res.summary["all_passed"], preds
    assert any(p["control"] for p in preds.values())
    # A rescaling of hidden units is a symmetry of the loss too, but not an isometry: the run from
    # Dθ₀ must leave D·θ(t), so the same check must fail for it.
    res = run_experiment("discrete-symmetry", quick=True, out=tmp_path,
                         overrides=["steps=40", "hidden=8,8", "n_data=128", "transforms=rescale"])
    preds = {p["name"]: p["passed"] for p in res.summary["predictions"]}
    assert not preds["rescale: SGD from Oθ₀ stays at O·θ(t) (max ‖θ' − Oθ‖/‖θ'‖)"]
