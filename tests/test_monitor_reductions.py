"""The monitor's per-step reductions and per-block derivation, against direct float64 sums.

The speed paths (a block plan laid out once per tensor shape; every running expectation advanced
in one loop over rows) must give the numbers of the plain computation: bit for bit where the
arithmetic is the same elementwise operation, else to float64 round-off.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import neurothermo as nt
from neurothermo.monitor import names, quantities
from neurothermo.monitor.derive import _running, _running_many
from neurothermo.monitor.quantities import SquareSums
from neurothermo.monitor.symmetries import track

sys.path.insert(0, str(Path(__file__).resolve().parent))
import foreign_models as fm


def test_running_many_equals_one_series_at_a_time_bit_for_bit() -> None:
    """Joined EMAs are elementwise the same updates: fresh states, carried states, and the
    fallback for states of mixed presence and for mixed dtypes."""
    g = torch.Generator().manual_seed(0)
    series = [torch.rand(7, n, generator=g, dtype=torch.float64) for n in (3, 1, 5)]
    beta = 0.9
    for states in ([None, None, None],
                   [torch.rand(n, generator=g, dtype=torch.float64) for n in (3, 1, 5)],
                   [None, torch.rand(1, generator=g, dtype=torch.float64), None]):
        ref_states = list(states)
        ref = []
        for k, x in enumerate(series):
            st = [ref_states[k]]
            ref.append(_running(st, x, beta))
            ref_states[k] = st[0]
        got_states = list(states)
        got = _running_many(got_states, series, beta)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
        for a, b in zip(got_states, ref_states):
            assert torch.equal(a, b)  # type: ignore[arg-type]
    mixed = [series[0], series[1].float()]
    states2: list = [None, None]
    out = _running_many(states2, mixed, beta)
    assert out[1].dtype == torch.float32 and states2[1].dtype == torch.float32
    assert _running_many([], [], beta) == []


@pytest.mark.parametrize("chunk", [100, None])
def test_block_plan_follows_shape_dtype_and_axes_of_a_name(monkeypatch, chunk: int | None) -> None:
    """One scratch dict across steps whose tensor under a name changes shape, dtype and asked
    axes: the plan is laid out again, and every result equals a fresh reduction bit for bit and
    the float64 ``Σ t²`` over the other axes to round-off."""
    if chunk is not None:
        monkeypatch.setattr(quantities, "_CHUNK_NUMEL", chunk)
    g = torch.Generator().manual_seed(0)
    scratch: dict = {}
    cases = [(torch.randn(30, 4, 3, 3, generator=g), [0, 1]),
             (torch.randn(30, 4, 3, 3, generator=g), [0, 1]),  # same plan, new values
             (torch.randn(12, 5, 3, 3, generator=g), [0, 1]),  # new shape
             (torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64), [0, 1]),  # new dtype
             (torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64), [1]),  # other axes
             (torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64), [1, 2, 3])]
    for w, dims in cases:
        keys = [("w", d, None) for d in dims]
        got = SquareSums({"w": w}, scratch).prepare(keys, ["w"])
        fresh = SquareSums({"w": w}, {}).prepare(keys, ["w"])
        for k in keys:
            assert torch.equal(got._along[k], fresh._along[k]), k
            others = [d for d in range(4) if d != k[1]]
            ref = w.double().square().sum(others)
            tol = 1e-14 if w.dtype == torch.float64 else 1e-6
            torch.testing.assert_close(got._along[k].double(), ref, rtol=tol, atol=0)


def _direct(tensors: dict[str, torch.Tensor], slices, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit squared sums of a symmetry's "in" and "out" slices, in float64 from the tensors."""
    e_in, e_out = np.zeros(n_units), np.zeros(n_units)
    for s in slices:
        if s.role == "passive" or s.buffer or s.dim is None or tensors.get(s.name) is None:
            continue
        t = tensors[s.name].double()
        v = t if s.view is None else t.view(s.view)
        others = [d for d in range(v.ndim) if d != s.dim % v.ndim]
        r = (v.square().sum(others) if others else v.square())[s.start:s.stop].numpy()
        if s.role == "in":
            e_in += r
        else:
            e_out += r
    return e_in, e_out


@pytest.mark.parametrize("accumulate", [False, True])
def test_resnet18_layout_unit_energies_and_charges_against_direct_sums(accumulate: bool) -> None:
    """ResNet-18 in torchvision's layout (width 4, float32): every per-unit gradient energy, charge
    and measured charge change the monitor records equals float64 sums of what ``p.grad`` and
    the parameters held (float32 round-off: rtol 1e-5 on sums of at most ~5000 squares). With
    ``accumulate`` two backward passes feed each step (gradient accumulation): the monitor reads
    the accumulated gradient."""
    torch.manual_seed(0)
    model = fm.resnet18(10, 4)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(10, (4,), generator=g))
               for _ in range(6)]
    syms = nt.find_symmetries(model, batches[0][0])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-3)
    mon = nt.ThermoMonitor(model, nn.CrossEntropyLoss(), optimizer=opt, noise_every=None,
                           symmetries=syms, sync_every=2)
    # the monitor numbers the charge-carrying symmetries (isometries left out) as track() does
    tracked = {t.index: t.sym for t in track(syms, dict(model.named_parameters()))}
    per_unit = [i for i, s in tracked.items() if s.kind in ("rescale", "scale") and s.block == 1
                and not s.whole]
    assert len(per_unit) >= 16  # every conv in front of a BatchNorm, every BatchNorm → ReLU → conv
    ref: dict[int, dict[str, list[np.ndarray]]] = {i: {"in": [], "out": [], "J": [], "dJ": []}
                                                   for i in per_unit}
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        for x, y in batches[2 * step: 2 * step + (2 if accumulate else 1)]:
            nn.functional.cross_entropy(model(x), y).backward()
        mon.after_backward(step, batches[2 * step])
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        mon.after_step(step)
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        for i in per_unit:
            s = tracked[i]
            e_in, e_out = _direct(grads, s.slices, s.n_units)
            ref[i]["in"].append(e_in)
            ref[i]["out"].append(e_out)
            j = np.subtract(*_direct(before, s.slices, s.n_units))
            ref[i]["J"].append(j)
            ref[i]["dJ"].append(np.subtract(*_direct(after, s.slices, s.n_units)) - j)
    h = mon.history
    with_energies = [i for i in per_unit if names.energy_in(i) in h]
    assert len(with_energies) >= 4  # per-unit symmetries whose energies are recorded (which ones
    # find_symmetries verifies at this width varies; each is checked below)
    for i in per_unit:
        r = {k: np.stack(v) for k, v in ref[i].items()}
        if i in with_energies:
            np.testing.assert_allclose(h[names.energy_in(i)], r["in"], rtol=1e-5)
            np.testing.assert_allclose(h[names.energy_out(i)], r["out"], rtol=1e-5)
        scale = np.abs(r["J"]).max()
        np.testing.assert_allclose(h[names.charge(i)], r["J"], rtol=1e-5, atol=1e-6 * scale)
        # a change is a difference of sums of size ~|J|: float32 round-off of |J|, not of ΔJ
        np.testing.assert_allclose(h[names.charge_meas(i)], r["dJ"], rtol=0, atol=1e-5 * scale)
