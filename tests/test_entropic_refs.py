"""Independent float64 references for the entropic tests (dense Hessians, per-sample loops, plain
GD), and checks of the references themselves against closed forms."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

DT = torch.float64


def tiny_regressor(seed: int = 0, *, batchnorm: bool = False) -> nn.Sequential:
    """3 → 5 (tanh) → 2, float64; optionally with a BatchNorm1d after the first layer."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(3, 5)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Linear(5, 2)]
    return nn.Sequential(*layers).to(DT)


def regression_data(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DT)
    y = torch.randn(n, 2, generator=g, dtype=DT)
    return x, y


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


# ---- checks of the references themselves ----

def test_dense_hessian_of_a_quadratic_is_exact() -> None:
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    p = {"w": torch.tensor([0.3, -0.7], dtype=DT)}
    g, h = dense_grad_hessian(lambda q: 0.5 * q["w"] @ a @ q["w"], p)
    torch.testing.assert_close(h, a)
    torch.testing.assert_close(g, a @ p["w"])


def test_naive_per_sample_loop_matches_dense_per_sample_hessians() -> None:
    model = tiny_regressor(3)
    x, y = regression_data(3)
    loss_fn = nn.MSELoss()
    sq, hg = naive_per_sample_hg(model, loss_fn, x, y)
    p = params_of(model)
    ref_sq, ref_hg = torch.zeros((), dtype=DT), torch.zeros_like(hg)
    for i in range(3):
        gi, hi = dense_grad_hessian(objective(model, loss_fn, x[i:i + 1], y[i:i + 1]), p)
        ref_sq += gi @ gi / 3
        ref_hg += hi @ gi / 3
    torch.testing.assert_close(sq, ref_sq)
    torch.testing.assert_close(hg, ref_hg)
