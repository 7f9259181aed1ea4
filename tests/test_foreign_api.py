"""Every public measuring function on every model of the foreign zoo, against independent references.

The zoo (``foreign_models.py``): torchvision-layout ResNet-18, timm-layout ViT (fused qkv, SDPA,
top-level cls_token/pos_embed), Hugging Face BERT (dict inputs with a padding mask) and GPT-2,
LSTM, GRU, GroupNorm CNN, tied-embedding LM; each test runs on every device of ``devices()``.
Everything is float64 (b = 4), so that "exact" can be checked to ~1e-9 relative.

References, none of them computed by neurothermo:
* per-sample gradients from a loop over single samples (``torch.autograd.grad``);
* Hessian-vector products from ``torch.autograd.functional.hvp`` on a ``functional_call`` of the
  model (under ``sdpa_kernel(SDPBackend.MATH)`` for the models using
  ``scaled_dot_product_attention``: the math backend has a double backward, the CPU flash kernel not);
* dense Hessians of a small parameter slice from ``torch.autograd.functional.hessian``;
* data given as a ``DataLoader`` (batches of unequal size) against the same samples as tensors.

Every cell must be exact, except the few listed in ``REFUSALS`` (passive capture declining models
it cannot read without changing the caller's own pass): there the function must either be exact or
refuse with a reason naming the unsupported part (then the cell is reported as xfail with that
message). Any other error, or an unlisted refusal, fails the test.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

import neurothermo as nt
from foreign_models import CASES, ForeignCase, devices, logits_of, skip_unavailable
from neurothermo.alignment import auto_layers, capture_features

F64 = torch.float64
B = 4
LR = 0.1
# Identities that hold exactly in exact arithmetic, computed along different float64 paths:
# rounding is ~1e-16 per operation, amplified by at most ~1e4 through sums and differences.
EXACT = 1e-9

SECOND_ORDER = ("entropic_force", "hvp", "top_eigenvalues", "hessian_trace", "sharpness_tracker")
# Passive capture reads the caller's own forward and backward: it declines models it cannot read
# bit for bit (the monitor then measures with an extra pass). Every other cell must be exact.
REPLACED = r"measured through a replacement forward"
REFUSALS: dict[tuple[str, str], str] = {
    ("backward_capture", "lstm"): REPLACED,
    ("backward_capture", "gru"): REPLACED,
    ("backward_capture", "torch_encoder"): REPLACED,  # nn.MultiheadAttention's fused forward
    # T5's relative position bias is shared by every sample: measured where it meets the batch,
    # which needs the layout probe before the forward; a passive capture starts inside the
    # caller's forward, so it declines (the monitor then measures with an extra pass)
    ("backward_capture", "t5"): r"relative_attention_bias",
}

# cuDNN's RNN kernels have no double backward (h/curv); not yet run on a GPU here, so the pattern is
# the kernel's name as torch reports it for a missing derivative.
CUDA_REFUSALS: dict[tuple[str, str], str] = {
    (f, m): r"cudnn" for f in (*SECOND_ORDER, "expected_entropic_force") for m in ("lstm", "gru")
}

PARAMS = [pytest.param(c, d, id=f"{c.name}-{d}") for c in CASES for d in devices()]


# ------------------------------------------------------------------------------------- helpers
def exact_or_refusal(function: str, case: ForeignCase, device: str,
                     call: Callable[[], Any]) -> Any:
    """``call()``; a listed cell may instead raise naming the unsupported part (reported as xfail)."""
    patterns = [REFUSALS.get((function, case.name))]
    if device == "cuda":
        patterns.append(CUDA_REFUSALS.get((function, case.name)))
    pattern = "|".join(p for p in patterns if p) or None
    if pattern is None:
        return call()
    try:
        return call()
    except (RuntimeError, ValueError, NotImplementedError) as err:
        msg = str(err)
        assert re.search(pattern, msg), f"{function} on {case.name} raised an unnamed error: {msg}"
        pytest.xfail(f"{function} on {case.name} refuses: {msg[:160]}")


_FLOOR = [0.0]  # the case under test's tolerance floor (ForeignCase.floor), set by setup()


def setup(case: ForeignCase, device: str, b: int = B, seed: int = 0) -> tuple[nn.Module, Any, Tensor]:
    skip_unavailable(case)
    _FLOOR[0] = case.floor
    model = case.model(device, F64).eval()
    inputs, targets = case.data(b, seed=seed, device=device, dtype=F64)
    return model, inputs, targets


def take(inputs: Any, idx: Any) -> Any:
    return {k: v[idx] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[idx]


def math_sdpa(case: ForeignCase) -> Any:
    """Backends with a double backward, for references only: the SDPA math backend for the models
    that call ``scaled_dot_product_attention``, cuDNN off for the recurrent ones."""
    if "rnn" in case.tags:
        return torch.backends.cudnn.flags(enabled=False)
    if "sdpa" not in case.tags:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_at(model: nn.Module, case: ForeignCase, params: dict[str, Tensor], inputs: Any,
            targets: Tensor) -> Tensor:
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
    return case.loss_fn(functional_call(model, params, args, kwargs), targets)


def flat_grad(model: nn.Module, case: ForeignCase, inputs: Any, targets: Tensor) -> Tensor:
    ps = params_of(model)
    loss = case.loss_fn(case.forward(model, inputs), targets)
    gs = torch.autograd.grad(loss, list(ps.values()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(gs, ps.values())])


def per_sample_grads(model: nn.Module, case: ForeignCase, inputs: Any, targets: Tensor) -> Tensor:
    """``[b, P]``: the gradient of every sample's own loss, one backward per sample."""
    n = targets.shape[0]
    return torch.stack([flat_grad(model, case, take(inputs, slice(i, i + 1)), targets[i:i + 1])
                        for i in range(n)])


def ref_hvp(model: nn.Module, case: ForeignCase, inputs: Any, targets: Tensor, v: Tensor) -> Tensor:
    """``H v`` of the batch's mean loss by ``torch.autograd.functional.hvp``."""
    ps = params_of(model)
    names = list(ps)
    sizes = [p.numel() for p in ps.values()]
    vs = tuple(t.reshape(p.shape) for t, p in zip(v.split(sizes), ps.values()))

    def f(*flat: Tensor) -> Tensor:
        return loss_at(model, case, dict(zip(names, flat)), inputs, targets)

    with math_sdpa(case):
        _, hv = torch.autograd.functional.hvp(f, tuple(p.detach() for p in ps.values()), vs)
    return torch.cat([h.reshape(-1) for h in hv])


def slice_name(model: nn.Module) -> str:
    """A small parameter early in the network (≤ 32 entries), for dense Hessians."""
    ps = params_of(model)
    small = [n for n, p in ps.items() if p.numel() <= 32]
    return small[0] if small else min(ps, key=lambda n: ps[n].numel())


def dense_slice_hessian(model: nn.Module, case: ForeignCase, inputs: Any, targets: Tensor,
                        name: str) -> Tensor:
    p0 = params_of(model)[name].detach()

    def f(p: Tensor) -> Tensor:
        return loss_at(model, case, {name: p}, inputs, targets)

    with math_sdpa(case):
        h = torch.autograd.functional.hessian(f, p0)
    return h.reshape(p0.numel(), p0.numel())


def close(a: Tensor | float, b: Tensor | float, rel: float = EXACT) -> bool:
    """``‖a − b‖ ≤ rel‖b‖``, ``rel`` raised to the case's floor (models computing in float32)."""
    rel = max(rel, _FLOOR[0])
    a, b = torch.as_tensor(a, dtype=F64).cpu(), torch.as_tensor(b, dtype=F64).cpu()
    return bool((a - b).norm() <= rel * max(float(b.norm()), 1e-300))


def flat(d: dict[str, Tensor], model: nn.Module) -> Tensor:
    return torch.cat([d[n].reshape(-1) for n in params_of(model)])


class Samples(Dataset):
    """The samples of one batch as a map-style dataset (a tensor or a dict of tensors each)."""

    def __init__(self, inputs: Any, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        return take(self.inputs, i), self.targets[i]


def loader(inputs: Any, targets: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(Samples(inputs, targets), batch_size=batch_size, shuffle=False)


# ------------------------------------------------------------------------------------- entropic
@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_entropic_loss(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    g = flat_grad(model, case, x, y)
    ref = case.loss_fn(case.forward(model, x), y).detach() + LR / 4 * g.square().sum()
    assert close(nt.entropic_loss(model, case.loss_fn, (x, y), lr=LR).detach(), ref)
    # a DataLoader with batches of 3 and 1 samples is the same data: weights 3/4 and 1/4
    got = nt.entropic_loss(model, case.loss_fn, loader(x, y, 3), lr=LR).detach()
    assert close(got, ref)


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_entropic_force(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    g = flat_grad(model, case, x, y)
    ref = -LR / 2 * ref_hvp(model, case, x, y, g)
    force = exact_or_refusal("entropic_force", case, device,
                             lambda: nt.entropic_force(model, case.loss_fn, (x, y), lr=LR))
    assert close(flat(force, model), ref)
    force_dl = nt.entropic_force(model, case.loss_fn, loader(x, y, 3), lr=LR)
    assert close(flat(force_dl, model), ref)


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_entropic_decomposition(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    gi = per_sample_grads(model, case, x, y)
    gbar = gi.mean(0)
    trace = float(gi.square().sum(1).mean() - gbar.square().sum())
    loss = float(case.loss_fn(case.forward(model, x), y))
    d = exact_or_refusal("entropic_decomposition", case, device, lambda: nt.entropic_decomposition(
        model, case.loss_fn, (x, y), lr=LR, batch_size=2))
    assert d.n_samples == B
    assert close(d.loss, loss)
    assert close(d.discretization, LR / 4 * gbar.square().sum())
    assert close(d.trace_sigma, trace, rel=1e-7)  # a difference of two terms: rounding × ‖ḡ‖²/Tr Σ
    assert close(d.noise, LR / 4 * trace / 2, rel=1e-7)
    d_dl = nt.entropic_decomposition(model, case.loss_fn, loader(x, y, 3), lr=LR, batch_size=2,
                                     num_data=B)
    assert close(d_dl.total, d.total) and d_dl.n_samples == B


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_expected_entropic_force(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    gi = per_sample_grads(model, case, x, y)
    gbar = gi.mean(0)
    f = 1 / 2  # Tr Σ_B / Tr Σ for batch size 2 with replacement
    # −(lr/4)∇[(1 − f)‖ḡ‖² + f·mean_i ‖g_i‖²] = −(lr/2)[(1 − f)·Hḡ + f·mean_i H_i g_i]
    h_gbar = ref_hvp(model, case, x, y, gbar)
    h_i = torch.stack([ref_hvp(model, case, take(x, slice(i, i + 1)), y[i:i + 1], gi[i])
                       for i in range(B)])
    ref = -LR / 2 * ((1 - f) * h_gbar + f * h_i.mean(0))
    e = exact_or_refusal("expected_entropic_force", case, device, lambda: nt.expected_entropic_force(
        model, case.loss_fn, (x, y), lr=LR, batch_size=2))
    assert close(flat(e.total, model), ref, rel=1e-7)


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_entropic_regularizer(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    halves = [flat_grad(model, case, take(x, slice(i, i + 2)), y[i:i + 2]) for i in (0, 2)]
    ref = LR / 4 * torch.stack([h.square().sum() for h in halves]).mean()
    reg = nt.EntropicRegularizer(lr=LR, batch_size=2)(model, case.loss_fn, (x, y))
    assert close(reg.detach(), ref)


# ------------------------------------------------------------------------------------- gradstats
@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_per_sample_grad_norms(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    ref = per_sample_grads(model, case, x, y).square().sum(1)
    norms = exact_or_refusal("per_sample_grad_norms", case, device,
                             lambda: nt.per_sample_grad_norms(model, case.loss_fn, (x, y)))
    assert close(norms, ref)
    assert close(nt.per_sample_grad_norms(model, case.loss_fn, loader(x, y, 3)), ref)


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_gradient_noise(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    gi = per_sample_grads(model, case, x, y)
    sq = gi.square().sum(1)
    # two batches of 2: T_k = (b/(b−1))·[(1/b)Σ‖g_i‖² − ‖ḡ_k‖²], pooled with equal weights
    tk = [2 * (sq[k:k + 2].mean() - gi[k:k + 2].mean(0).square().sum()) for k in (0, 2)]
    ref_trace = float(torch.stack(tk).mean())
    ref_pop = float(sq.mean() - gi.mean(0).square().sum())
    noise = exact_or_refusal("gradient_noise", case, device, lambda: nt.gradient_noise(
        model, case.loss_fn, (x, y), batch_size=2))
    assert close(noise.trace_sigma, ref_trace, rel=1e-7)
    assert close(noise.trace_sigma_population, ref_pop, rel=1e-7)
    noise_dl = nt.gradient_noise(model, case.loss_fn, loader(x, y, 2))
    assert close(noise_dl.trace_sigma, noise.trace_sigma)
    assert (noise_dl.n_samples, noise_dl.n_batches) == (B, 2)


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_backward_capture(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    ref = per_sample_grads(model, case, x, y).square().sum(1)
    # the monitor's contract: the full check (per_sample_grad_norms) runs once before capturing
    exact_or_refusal("backward_capture", case, device,
                     lambda: nt.per_sample_grad_norms(model, case.loss_fn, (x, y)))
    params = params_of(model)
    plain = torch.autograd.grad(case.loss_fn(case.forward(model, x), y), list(params.values()),
                                allow_unused=True)
    cap = nt.BackwardCapture(model, params)
    cap.arm()
    case.loss_fn(case.forward(model, x), y).backward()
    got = cap.norms((x, y))
    # captured or not, the caller's own pass is untouched: its gradients are bit for bit those
    # of a pass without the capture (ViT's batched cls_token/pos_embed, HF's expanded positions)
    for (n, p), g in zip(params.items(), plain):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g)), n
    model.zero_grad(set_to_none=True)
    if got is None:  # a listed refusal, with its reason
        pattern = REFUSALS.get(("backward_capture", case.name))
        assert pattern is not None and cap.reason and re.search(pattern, cap.reason), cap.reason
        pytest.xfail(f"backward_capture on {case.name}: {cap.reason}")
    assert close(got, ref)


# ------------------------------------------------------------------------------------- curvature
@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_hvp(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    n = sum(p.numel() for p in params_of(model).values())
    v = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    ref = ref_hvp(model, case, x, y, v)
    hv = exact_or_refusal("hvp", case, device, lambda: nt.hvp(model, case.loss_fn, (x, y), v))
    assert close(flat(hv, model), ref)
    assert close(flat(nt.hvp(model, case.loss_fn, loader(x, y, 3), v), model), ref)


_SLICES: dict[tuple[str, str], tuple[str, Tensor]] = {}


def slice_hessian(case: ForeignCase, device: str, model: nn.Module, x: Any, y: Tensor
                  ) -> tuple[str, Tensor]:
    """The slice's name and its dense Hessian, computed once per (model, device)."""
    key = (case.name, device)
    if key not in _SLICES:
        name = slice_name(model)
        _SLICES[key] = (name, dense_slice_hessian(model, case, x, y, name))
    return _SLICES[key]


TOL = 1e-8  # Lanczos stops when its error estimate is ≤ tol·|λ|; float64 rounding is far below


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_top_eigenvalue_on_a_dense_slice(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    name, h = slice_hessian(case, device, model, x, y)
    evals = torch.linalg.eigvalsh(h)
    r = exact_or_refusal("top_eigenvalues", case, device, lambda: nt.top_eigenvalues(
        model, case.loss_fn, (x, y), k=1, tol=TOL, param_filter=[name]))
    assert abs(float(r.values[0]) - float(evals[-1])) <= max(10 * TOL, case.floor) * float(evals.abs().max()) + 1e-12


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_hessian_trace_on_a_dense_slice(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    name, h = slice_hessian(case, device, model, x, y)
    d = h.shape[0]
    # Hutch++ with a sketch of d columns spans the whole slice: the estimate is the exact trace
    t = exact_or_refusal("hessian_trace", case, device, lambda: nt.hessian_trace(
        model, case.loss_fn, loader(x, y, 3), n_samples=3 * d, method="hutch++",
        param_filter=[name]))
    scale = float(h.abs().max())
    assert math.isclose(t.estimate, float(torch.trace(h)), rel_tol=max(1e-8, case.floor),
                        abs_tol=1e-10 * scale * d)


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_sharpness_tracker_on_a_dense_slice(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    name, h = slice_hessian(case, device, model, x, y)
    evals = torch.linalg.eigvalsh(h)
    tracker = nt.SharpnessTracker(k=1, tol=TOL, param_filter=[name])
    reading = exact_or_refusal("sharpness_tracker", case, device,
                               lambda: tracker.update(model, case.loss_fn, loader(x, y, 3), step=0))
    assert abs(reading.lambda_max - float(evals[-1])) <= max(10 * TOL, case.floor) * float(evals.abs().max()) + 1e-12


# ------------------------------------------------------------------------------------- train, monitor
@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_train_on_a_dataloader_is_train_on_its_tensors(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device, b=6)
    model_b = case.model(device, F64)
    h_tensors = nt.train(model, case.loss_fn, (x, y), lr=LR, batch_size=2, steps=3, seed=1)
    h_loader = nt.train(model_b, case.loss_fn, loader(x, y, 4), lr=LR, batch_size=2, steps=3,
                        seed=1)
    assert np.array_equal(h_tensors["loss"], h_loader["loss"])


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_monitor_noise_terms_in_train(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device, b=6)
    mon = nt.ThermoMonitor(model, case.loss_fn, noise_every=1, symmetries=None)
    if "batchnorm" in case.tags:  # train() puts BatchNorm in train mode: Σ is undefined there
        with pytest.warns(nt.MonitorWarning, match="BatchNorm"):
            hist = nt.train(model, case.loss_fn, (x, y), lr=LR, batch_size=3, steps=2, monitor=mon)
        assert "entropic/trace_sigma" not in hist
        return
    hist = nt.train(model, case.loss_fn, (x, y), lr=LR, batch_size=3, steps=2, monitor=mon)
    trace = hist["entropic/trace_sigma"]
    assert trace.shape == (2,) and bool(np.isfinite(trace).all())


# ------------------------------------------------------------------------------------- capture
EXPECTED_BLOCKS = {
    "resnet18": [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)],
    "vit": ["blocks.0", "blocks.1"],
    "bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    "gpt2": ["transformer.h.0", "transformer.h.1"],
}


@pytest.mark.parametrize(("case", "device"), PARAMS)
def test_capture_features(case: ForeignCase, device: str) -> None:
    model, x, y = setup(case, device)
    names = auto_layers(model)
    if case.name in EXPECTED_BLOCKS:  # every stage of the ResNet, every block of a transformer
        assert names == EXPECTED_BLOCKS[case.name]
    feats = capture_features(model, x)
    assert list(feats) == names
    # reference for the last block: a hand-made hook, mean-pooled as documented
    seen: list[Tensor] = []
    handle = model.get_submodule(names[-1]).register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        case.forward(model, x)
    handle.remove()
    h = seen[0]
    decoder = ".decoder." in f".{names[-1]}."  # pooled over its own stream (decoder tokens)
    if h.ndim == 3 and isinstance(x, dict) and "attention_mask" in x and not decoder:
        w = x["attention_mask"].to(h.dtype).unsqueeze(-1)
        ref = (h * w).sum(1) / w.sum(1)
    elif h.ndim == 3:
        ref = h.mean(1)
    elif h.ndim > 3:
        ref = h.flatten(2).mean(2)
    else:
        ref = h
    assert close(feats[names[-1]], ref)
    dl = capture_features(model, loader(x, y, 3))
    assert all(close(dl[n], feats[n]) for n in names)


# ------------------------------------------------------------------------------------- own loss
@pytest.mark.parametrize("device", devices())
def test_model_returned_loss_is_the_loss_fn_loss(device: str) -> None:
    """HF models compute their loss when the labels are among the inputs: ``nt.model_loss``."""
    from foreign_models import case as get

    bert = get("bert")
    model, x, y = setup(bert, device)
    with_labels = {**x, "labels": y}
    for fn in (lambda d, lf: nt.entropic_loss(model, lf, d, lr=LR).detach(),
               lambda d, lf: nt.EntropicRegularizer(lr=LR, batch_size=2)(model, lf, d).detach()):
        assert close(fn(with_labels, nt.model_loss), fn((x, y), bert.loss_fn))
        assert close(fn(with_labels, None), fn((x, y), bert.loss_fn))
    gpt2 = get("gpt2")
    model, x, _ = setup(gpt2, device)
    ids = x["input_ids"]
    logits = logits_of(model(input_ids=ids))[:, :-1]
    ref = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    got = nt.entropic_loss(model, nt.model_loss, {"input_ids": ids, "labels": ids}, lr=LR)
    grads = torch.autograd.grad(ref, list(params_of(model).values()), allow_unused=True)
    gsq = sum(float(t.square().sum()) for t in grads if t is not None)
    # HF's causal-LM loss casts the logits to float32 (logits.float()): float32 rounding, ~1e-7
    assert close(got.detach(), float(ref) + LR / 4 * gsq, rel=1e-6)
