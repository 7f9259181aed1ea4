"""The test suite's one module of independent references (float64 throughout):

* per-sample gradients by a loop of b separate backward passes (``l_i`` = the loss on the batch
  ``{i}``) — the gradstats tests;
* dense Hessians by ``torch.func.hessian`` on a flat parameter vector (``dense_hessian``, an
  independent path from the Hessian-vector products under test) and by
  ``torch.autograd.functional`` on parameter dicts (``dense_grad_hessian``), small models and data —
  the curvature tests;
* per-sample ``H_i g_i`` loops, plain GD, log-log slopes with tolerances derived from the next-order
  term — the entropic tests.

The references' own checks against closed forms are in ``test_curvature_reference.py`` and
``test_entropic_refs.py``."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

DT = torch.float64
RTOL = 1e-10  # float64, exact formulas on both sides: only rounding (~1e-16 per operation) differs
LossFn = Callable[[Tensor, Tensor], Tensor]


def per_sample_grads(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``{name: [N, numel]}`` of ``g_i = ∇ l_i`` for the parameters that require a gradient, one
    backward per sample; zeros for a parameter that does not reach the loss."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), list(named.values()),
                                allow_unused=True)
        rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, named.values())])
    return {n: torch.stack([r[j].flatten() for r in rows]) for j, n in enumerate(named)}


def rel_change(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` (Frobenius, detached): how much a transform changed an output ``b``."""
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def naive_sq_norms(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``‖∇_θ l_i‖²`` per parameter (``{name: [N]}``), from :func:`per_sample_grads`."""
    return {n: g.square().sum(1) for n, g in per_sample_grads(model, loss_fn, x, y).items()}


def naive_total_sq_norms(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    """``‖∇ l_i‖²`` over all parameters that require a gradient, ``[N]``."""
    return torch.stack(list(naive_sq_norms(model, loss_fn, x, y).values())).sum(0)


def assert_matches_naive(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                         rtol: float = RTOL) -> None:
    """``per_sample_grad_norms`` (by parameter and in total) equals the loop to ``rtol`` (``RTOL``
    unless the model computes in float32 inside: ``ForeignCase.floor``); the absolute floor is
    ``rtol·1e-3`` of the largest per-sample total, for norms that cancel to ~0."""
    from neurothermo.gradstats import per_sample_grad_norms

    ref = naive_sq_norms(model, loss_fn, x, y)
    got = per_sample_grad_norms(model, loss_fn, (x, y), by_parameter=True)
    assert isinstance(got, dict)
    assert list(got) == list(ref)
    scale = float(torch.stack(list(ref.values())).sum(0).max())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=rtol, atol=rtol * 1e-3 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")
    total = per_sample_grad_norms(model, loss_fn, (x, y))
    assert isinstance(total, Tensor) and total.shape == (x.shape[0],)
    torch.testing.assert_close(total, torch.stack(list(ref.values())).sum(0), rtol=rtol, atol=0)


# ---- dense Hessians and small models (curvature) ----------------------------------------


def flat_params(model: nn.Module, names: list[str] | None = None) -> tuple[list[str], Tensor]:
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    return names, torch.cat([params[n].detach().reshape(-1) for n in names])


def loss_of_flat(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                 names: list[str] | None = None) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``f(flat θ) = loss_fn(model_θ(x), y)`` over the parameters ``names`` (others fixed)."""
    params = dict(model.named_parameters())
    names, theta = flat_params(model, names)
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]

    def f(flat: Tensor) -> Tensor:
        d = {n: c.view(s) for n, c, s in zip(names, flat.split(numels), shapes)}
        return loss_fn(functional_call(model, d, (x,)), y)

    return f, theta


def dense_hessian(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                  names: list[str] | None = None) -> Tensor:
    """Dense Hessian of the mean loss over all of ``(x, y)`` (float64 if the model is)."""
    f, theta = loss_of_flat(model, loss_fn, x, y, names)
    H = hessian(f)(theta).detach()
    # a reference must be trustworthy: torch.func's batching of some kernels (native batch_norm's
    # double backward) returns asymmetric Hessians, so refuse those
    assert torch.allclose(H, H.T, rtol=1e-10, atol=1e-12), "dense reference Hessian is not symmetric"
    return H


def mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 3)).double()


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


def deep_linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 4, bias=False),
                         nn.Linear(4, 2, bias=False)).double()


def classification_data(n: int = 40, shape: tuple[int, ...] = (5,), seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def regression_data(n: int = 30, d: int = 3, o: int = 2, seed: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, o, generator=g, dtype=torch.float64))


# ---- entropic references ------------------------------------------------------------


def tiny_regressor(seed: int = 0, *, batchnorm: bool = False) -> nn.Sequential:
    """3 → 5 (tanh) → 2, float64; optionally with a BatchNorm1d after the first layer."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 5)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Linear(5, 2)]
    return nn.Sequential(*layers).to(DT)



def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def objective(model: nn.Module, loss_fn: Callable[..., Tensor], x: Tensor, y: Tensor,
              wd: float = 0.0) -> Callable[[dict[str, Tensor]], Tensor]:
    def f(p: dict[str, Tensor]) -> Tensor:
        out = loss_fn(functional_call(model, p, (x,)), y)
        return out + 0.5 * wd * sum((v * v).sum() for v in p.values())
    return f


def flat(d: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def unflat(v: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = v[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


def dense_grad_hessian(f: Callable[[dict[str, Tensor]], Tensor],
                       p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Flat gradient and dense Hessian of ``f`` at ``p`` (torch.autograd.functional)."""
    v = flat(p).detach()
    g = torch.autograd.functional.jacobian(lambda w: f(unflat(w, p)), v)
    h = torch.autograd.functional.hessian(lambda w: f(unflat(w, p)), v)
    return g, h


def naive_per_sample_hg(model: nn.Module, loss_fn: Callable[..., Tensor], x: Tensor,
                        y: Tensor) -> tuple[Tensor, Tensor]:
    """``(1/N)Σ_i ‖g_i‖²`` and ``(1/N) Σ_i H_i g_i`` (flat) by a loop of per-sample HVPs."""
    params = [p for p in model.parameters() if p.requires_grad]
    sq = torch.zeros((), dtype=DT)
    hg = torch.zeros(sum(p.numel() for p in params), dtype=DT)
    for i in range(x.shape[0]):
        li = loss_fn(model(x[i:i + 1]), y[i:i + 1])
        gi = torch.autograd.grad(li, params, create_graph=True)
        hvi = torch.autograd.grad(gi, params, grad_outputs=[t.detach() for t in gi])
        sq += sum((t.detach() ** 2).sum() for t in gi)
        hg += torch.cat([h.reshape(-1) for h in hvi])
    return sq / x.shape[0], hg / x.shape[0]


def gd(f: Callable[[dict[str, Tensor]], Tensor], p: dict[str, Tensor], lr: float, steps: int,
       lam: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``steps`` steps ``θ ← θ − lr·Λ·∇f(θ)`` (Λ = I when None)."""
    p = {k: v.detach().clone() for k, v in p.items()}
    for _ in range(steps):
        leaves = {k: v.requires_grad_(True) for k, v in p.items()}
        gs = torch.autograd.grad(f(leaves), list(leaves.values()))
        p = {k: (v - lr * (g if lam is None else lam[k] * g)).detach()
             for (k, v), g in zip(leaves.items(), gs)}
    return p


def dist(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def top_curvature(f: Callable[[dict[str, Tensor]], Tensor], p: dict[str, Tensor]) -> float:
    """Largest |eigenvalue| of the dense Hessian: the scale of the relative next-order term."""
    _, h = dense_grad_hessian(f, p)
    return float(torch.linalg.eigvalsh(h).abs().max())


def slope_tolerance(lam: float, lr_max: float, factor: float = 1.0) -> float:
    """Tolerance of a fitted log-log slope from the next-order term.

    An error ``e(η) = Cη^p(1 + aη + O(η²))`` has local slope ``p + aη/(1 + aη)``; the fit over
    ``η ≤ η_max`` lies between the local slopes, so its bias is at most ``|a|η_max/(1 − |a|η_max)``.
    The relative next-order term of these step/flow expansions is a power series in ``ηH``
    (``factor·H`` for matrix learning rates), so ``|a| ≈ factor·λ_max``; we allow twice that.
    The result must stay below ½, or adjacent orders could pass for each other.
    """
    a_eta = 2.0 * factor * lam * lr_max
    tol = a_eta / (1.0 - a_eta) if a_eta < 1 else math.inf
    assert tol < 0.5, f"η range too large for a slope test: tolerance {tol:.2f} >= 0.5"
    return max(tol, 0.05)
