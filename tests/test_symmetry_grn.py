"""find_symmetries through reductions and ConvNeXt-V2's global response normalisation (GRN)
``x' = gamma ⊙ (x ⊙ Nx) + beta + x`` with ``Nx = ‖x‖_HW / mean_C(‖x‖_HW)``: the channels are
permuted through it (gamma and beta along), but not rescaled (``mean_C`` mixes the channels'
scales). Every reported symmetry is re-checked by hand on a float64 deepcopy with fresh inputs;
each control checks by hand that the transform it rules out changes the outputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import neurothermo as nt
from _helpers import rel_change as _rel
from neurothermo.symmetry import Symmetry

D = torch.float64
GEN = torch.Generator().manual_seed(13)


def _alpha(n: int) -> Tensor:
    """Log-uniform in [0.1, 10]."""
    return torch.exp((torch.rand(n, generator=GEN, dtype=D) * 2 - 1) * torch.log(torch.tensor(10.0)))


class GRN(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, 1, c))
        self.bias = nn.Parameter(torch.randn(1, 1, 1, c))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (x * n) + self.bias + x


class Block(nn.Module):
    """channels-last ``fc1 → ReLU → GRN → fc2``, then a mean over positions and a head."""

    def __init__(self, d: int = 4, m: int = 8) -> None:
        super().__init__()
        self.fc1, self.grn, self.fc2 = nn.Linear(d, m), GRN(m), nn.Linear(m, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc2(self.grn(torch.relu(self.fc1(x))))
        return self.head(torch.tanh(h.mean(dim=(1, 2))))


def _on(syms: list[Symmetry], name: str) -> list[Symmetry]:
    return [s for s in syms if any(sl.name == name for sl in s.slices)]


def test_grn_permutes_channels_but_does_not_rescale_them() -> None:
    torch.manual_seed(0)
    model = Block().to(D)
    x = torch.randn(3, 5, 5, 4, dtype=D)
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    kinds = sorted(s.kind for s in _on(list(report), "fc1.weight"))
    assert kinds == ["permutation"], str(report)
    names = {sl.name for sl in _on(list(report), "fc1.weight")[0].slices}
    assert {"grn.weight", "grn.bias", "fc2.weight"} <= names
    assert any(r.kind == "rescale" and r.location.startswith("fc1") and "mean" in r.reason
               for r in report.rejected), str(report)
    # the head's input units (mean over positions, then tanh) are sign-flipped and permuted
    assert sorted(s.kind for s in _on(list(report), "fc2.bias")) == ["permutation", "sign_flip"]
    fresh = torch.randn(6, 4, 3, 4, dtype=D, generator=GEN)
    ref = model(fresh)
    perm = torch.randperm(8, generator=GEN)
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        m2.fc1.weight.copy_(m2.fc1.weight[perm]), m2.fc1.bias.copy_(m2.fc1.bias[perm])
        m2.grn.weight.copy_(m2.grn.weight[..., perm]), m2.grn.bias.copy_(m2.grn.bias[..., perm])
        m2.fc2.weight.copy_(m2.fc2.weight[:, perm])
    assert _rel(m2(fresh), ref) < 1e-12
    # control: the same units rescaled (ReLU alone would allow it; GRN's channel mean does not)
    a = _alpha(8)
    m3 = copy.deepcopy(model)
    with torch.no_grad():
        m3.fc1.weight.mul_(a[:, None]), m3.fc1.bias.mul_(a), m3.fc2.weight.div_(a[None, :])
    assert _rel(m3(fresh), ref) > 1e-3
    # control: a permutation without gamma/beta permuted along is not one
    m4 = copy.deepcopy(model)
    with torch.no_grad():
        m4.fc1.weight.copy_(m4.fc1.weight[perm]), m4.fc1.bias.copy_(m4.fc1.bias[perm])
        m4.fc2.weight.copy_(m4.fc2.weight[:, perm])
    assert _rel(m4(fresh), ref) > 1e-3


class MeanPool(nn.Module):
    """``head(relu(fc(x)).sum(dim=1))``: a reduction over positions keeps the units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.fc(x)).sum(dim=1))


def test_sum_over_positions_keeps_the_units() -> None:
    torch.manual_seed(1)
    model = MeanPool().to(D)
    report = nt.find_symmetries(model, torch.randn(3, 5, 4, dtype=D), explain=True, progress=False)
    assert sorted(s.kind for s in report) == ["permutation", "rescale"], str(report)
    fresh = torch.randn(7, 2, 4, dtype=D, generator=GEN)
    ref, a = model(fresh), _alpha(6)
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        m2.fc.weight.mul_(a[:, None]), m2.fc.bias.mul_(a), m2.head.weight.div_(a[None, :])
    assert _rel(m2(fresh), ref) < 1e-12


transformers = pytest.importorskip("transformers")


def test_convnextv2_grn_permutation_and_final_norm_rescale_by_hand(capfd) -> None:
    torch.manual_seed(0)
    cfg = transformers.ConvNextV2Config(
        num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
        drop_path_rate=0.0, image_size=8, num_labels=3)
    model = transformers.ConvNextV2ForImageClassification(cfg).to(D).eval()
    with torch.no_grad():  # GRN is zero-initialised: make it act
        for n, p in model.named_parameters():
            if "grn" in n:
                p.copy_(torch.randn(p.shape, generator=GEN, dtype=D))
    x = torch.randn(4, 3, 8, 8, dtype=D, generator=GEN)
    report = nt.find_symmetries(model, x, explain=True, progress=False)
    assert "Traceback" not in capfd.readouterr().err  # no raw tracebacks from the capture
    assert report.blocks[0].status == "analysed", str(report)
    syms = list(report)
    for st, m in ((0, 32), (1, 64)):
        pre = f"convnextv2.encoder.stages.{st}.layers.0."
        perms = [s for s in _on(syms, pre + "pwconv1.weight") if s.kind == "permutation"]
        assert len(perms) == 1 and perms[0].n_units == m, str(report)
        assert {pre + "grn.weight", pre + "grn.bias"} <= {sl.name for sl in perms[0].slices}
        assert not [s for s in _on(syms, pre + "grn.bias") if s.kind != "permutation"]
    final = [s for s in _on(syms, "classifier.weight") if s.kind == "rescale"]
    assert len(final) == 1 and final[0].slices[0].name.startswith("convnextv2.layernorm")

    fresh = torch.randn(5, 3, 8, 8, dtype=D, generator=GEN)

    def out(m: nn.Module) -> Tensor:
        with torch.no_grad():
            return m(pixel_values=fresh).logits

    ref = out(model)
    layer = model.convnextv2.encoder.stages[0].layers[0]
    perm = torch.randperm(32, generator=GEN)
    m2 = copy.deepcopy(model)
    l2 = m2.convnextv2.encoder.stages[0].layers[0]
    with torch.no_grad():
        l2.pwconv1.weight.copy_(l2.pwconv1.weight[perm]), l2.pwconv1.bias.copy_(l2.pwconv1.bias[perm])
        l2.grn.weight.copy_(l2.grn.weight[..., perm]), l2.grn.bias.copy_(l2.grn.bias[..., perm])
        l2.pwconv2.weight.copy_(l2.pwconv2.weight[:, perm])
    assert _rel(out(m2), ref) < 1e-12
    a = _alpha(16)
    m3 = copy.deepcopy(model)
    with torch.no_grad():
        m3.convnextv2.layernorm.weight.mul_(a), m3.convnextv2.layernorm.bias.mul_(a)
        m3.classifier.weight.div_(a)
    assert _rel(out(m3), ref) < 1e-12
    for s in perms + final:  # the library's transform agrees, on fresh inputs
        m = copy.deepcopy(model)
        s.transform(m, s.random_element(GEN, dtype=D))
        assert _rel(out(m), ref) < 1e-12, s
    # control: pwconv1 → GELU → GRN rescaled by hand changes the output
    a32 = _alpha(32)
    m4 = copy.deepcopy(model)
    l4 = m4.convnextv2.encoder.stages[0].layers[0]
    with torch.no_grad():
        l4.pwconv1.weight.mul_(a32[:, None]), l4.pwconv1.bias.mul_(a32)
        l4.pwconv2.weight.div_(a32[None, :])
    assert _rel(out(m4), ref) > 1e-3
    assert layer is not l4
