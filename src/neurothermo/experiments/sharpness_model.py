"""The 2-2-2 linear network of ``sharpness-phase``: closed forms and a batched SGD simulator.

Model ``f = W₂W₁x`` (``W₁``: hidden × input, ``W₂``: output × hidden, all 2 × 2), ``x ~ N(0, Σ_x)``,
``y = x + ε`` with ``ε ~ N(0, Σ_ε)``, both diagonal. Per-sample loss ``K‖f − y‖²``; torch's
``nn.MSELoss()`` (mean over the batch of ``b`` samples and over the 2 outputs) is ``K = ½``. The
population loss is ``K·(Tr[(M − I)Σ_x(M − I)ᵀ] + Tr Σ_ε)`` with ``M = W₂W₁``.

*Data balance* ``p`` enters through one of three readings: ``"label"`` (``Σ_x = I``,
``Σ_ε = diag(1, p)``), ``"input"`` (``Σ_x = diag(1, p)``, ``Σ_ε = I``) or ``"both"``.

**Charge.** ``W₁ → GW₁``, ``W₂ → W₂G⁻¹`` leaves every per-sample loss unchanged, so for
``Q = W₁W₁ᵀ − W₂ᵀW₂`` the first-order terms of an SGD step cancel exactly and, for any ``η``,
``Q' − Q = η²(g₁g₁ᵀ − g₂ᵀg₂)`` with the step's batch gradients ``g₁, g₂``.

**Noise balance.** On the minimum manifold ``W₂ = W₁⁻¹ = A⁻¹`` the residual is ``−ε`` and the batch
gradients have ``E[g₁g₁ᵀ] = (4K²/b)·Tr Σ_x·A⁻ᵀΣ_εA⁻¹`` and ``E[g₂ᵀg₂] = (4K²/b)·Tr Σ_ε·AΣ_xAᵀ``;
``E[ΔQ] = 0`` picks ``A = diag(a)`` with ``a_l⁴ = (ε_l/s_l)·Tr Σ_x/Tr Σ_ε`` (``s_l``, ``ε_l``:
the input and noise variances). The population Hessian there has eigenvalues
``2K·s_l·(a_l² + a_k⁻²)`` for each (output k, input l) weight pair, so the equilibrium sharpness is
``λ* = 2K·max_{k,l} s_l(a_l² + a_k⁻²)``; label reading: ``λ*(p) = 2K[√(2/(1+p)) + √((1+p)/(2p))]``.
This is the leading order in ``η``: at finite ``η`` fluctuations off the manifold add their own gradient
covariance, of relative size ``O(ηλ)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

READINGS = ("label", "input", "both")


def check_balance(p: float, name: str = "p") -> float:
    """Return ``p`` if ``0 < p ≤ 1``; else raise ``ValueError`` naming the setting.

    ``p = 1`` is the balanced data set (no imbalance to sharpen toward); ``p ≤ 0`` makes a variance
    vanish and the equilibrium ``a_l⁴ ∝ ε_l/s_l`` degenerate (0 or ∞).
    """
    if not (isinstance(p, int | float) and math.isfinite(p) and 0 < p <= 1):
        raise ValueError(f"setting {name!r} = {p!r}: the data balance must lie in (0, 1] "
                         "(a variance ratio; 1 = balanced). Pick values such as 0.02 … 0.4.")
    return float(p)


def covariances(p: float, reading: str = "label") -> tuple[tuple[float, float], tuple[float, float]]:
    """``(diag Σ_x, diag Σ_ε)`` for data balance ``p`` under a reading (see module docstring).

    Raises:
        ValueError: ``p`` outside (0, 1] or an unknown reading.
    """
    check_balance(p)
    if reading == "label":
        return (1.0, 1.0), (1.0, p)
    if reading == "input":
        return (1.0, p), (1.0, 1.0)
    if reading == "both":
        return (1.0, p), (1.0, p)
    raise ValueError(f"setting 'reading' = {reading!r}: choose one of {READINGS}")


def equilibrium_scales(sx: Tensor, se: Tensor) -> Tensor:
    """``a`` with ``a_l⁴ = (ε_l/s_l)·Tr Σ_x/Tr Σ_ε``, batched over leading dims (``sx, se``: (..., 2))."""
    return (se / sx * sx.sum(-1, keepdim=True) / se.sum(-1, keepdim=True)) ** 0.25


def equilibrium_sharpness(sx: Tensor, se: Tensor, k: Tensor | float) -> Tensor:
    """``λ* = 2K·max_{k,l} s_l(a_l² + a_k⁻²)`` at the noise-balanced point (batched, (..., 2) → (...))."""
    a2 = equilibrium_scales(sx, se) ** 2
    pair = sx[..., None, :] * (a2[..., None, :] + 1 / a2[..., :, None])   # [k, l]
    return 2 * torch.as_tensor(k, dtype=sx.dtype) * pair.flatten(-2).amax(-1)


def lambda_star(p: float, k: float = 0.5, reading: str = "label") -> float:
    """Equilibrium sharpness λ*(p) of a reading; label reading ``2K[√(2/(1+p)) + √((1+p)/(2p))]``.

    Example:
        >>> round(lambda_star(0.1), 4)
        3.6936

    Raises:
        ValueError: ``p`` outside (0, 1] (names the setting ``p``).
    """
    sx, se = covariances(p, reading)
    t = torch.tensor
    return float(equilibrium_sharpness(t(sx, dtype=torch.float64), t(se, dtype=torch.float64), k))


def start_sharpness(sx: Tensor, k: Tensor | float) -> Tensor:
    """Sharpness of the balanced start ``W₁ = W₂ = I``: ``4K·max_l s_l``."""
    return 4 * torch.as_tensor(k, dtype=sx.dtype) * sx.amax(-1)


def manifold_drift(A: Tensor, sx: Tensor, se: Tensor, k: Tensor | float, b: int) -> Tensor:
    """Exact ``E[g₁g₁ᵀ − g₂ᵀg₂]`` for one SGD batch of size ``b`` at ``W₁ = A``, ``W₂ = A⁻¹``.

    ``(4K²/b)·(Tr Σ_x·A⁻ᵀΣ_εA⁻¹ − Tr Σ_ε·AΣ_xAᵀ)``: the expected charge change of one step is ``η²``
    times this (batched: ``A`` (C, 2, 2), ``sx, se`` (C, 2), ``k`` (C,) or float).
    """
    k = torch.as_tensor(k, dtype=A.dtype)
    Ai = torch.linalg.inv(A)
    t1 = sx.sum(-1)[..., None, None] * Ai.transpose(-1, -2) @ torch.diag_embed(se) @ Ai
    t2 = se.sum(-1)[..., None, None] * A @ torch.diag_embed(sx) @ A.transpose(-1, -2)
    out: Tensor = (4 * k**2 / b)[..., None, None] * (t1 - t2) if k.ndim else 4 * k**2 / b * (t1 - t2)
    return out


def charge(W1: Tensor, W2: Tensor) -> Tensor:
    """``Q = W₁W₁ᵀ − W₂ᵀW₂`` (hidden × hidden), batched."""
    return W1 @ W1.transpose(-1, -2) - W2.transpose(-1, -2) @ W2


def gradients(W1: Tensor, W2: Tensor, x: Tensor, y: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Batch gradients of ``(K/b)·Σ_i ‖W₂W₁x_i − y_i‖²`` for chains ``(C, ·, ·)``; ``x, y``: (C, b, 2).

    ``g₂ = (2K/b)·Σ r hᵀ``, ``g₁ = (2K/b)·W₂ᵀ Σ r xᵀ`` with ``h = W₁x``, ``r = W₂h − y``. With
    ``K = ½`` this is the gradient of ``nn.MSELoss()`` (mean over batch and outputs).
    """
    b = x.shape[1]
    h = x @ W1.transpose(1, 2)
    r = h @ W2.transpose(1, 2) - y
    scale = (2 * k / b)[:, None, None]
    rT = r.transpose(1, 2)
    g2 = scale * (rT @ h)
    g1 = scale * (W2.transpose(1, 2) @ (rT @ x))
    return g1, g2


def population_hessian(W1: Tensor, W2: Tensor, sx: Tensor, k: Tensor) -> Tensor:
    """Exact Hessian (C, 8, 8) of ``K·Tr[(W₂W₁ − I)Σ_x(W₂W₁ − I)ᵀ]`` in ``w = (vec W₁, vec W₂)``.

    Row-major vec. Gauss–Newton part ``2K·Jᵀ diag(s) J`` with ``δM = δW₂W₁ + W₂δW₁``, plus the
    residual part ``2K·s_l·E_il`` on the (W₁[j,l], W₂[i,j]) pairs, ``E = W₂W₁ − I``.
    """
    C, dt = W1.shape[0], W1.dtype
    eye = torch.eye(2, dtype=dt, device=W1.device)
    # J[c, (i,l), (j,m)] for W1: W2[i,j]·δ_lm ; for W2: δ_ij·W1[m,l]
    J1 = torch.einsum("cij,lm->ciljm", W2, eye).reshape(C, 4, 4)
    J2 = torch.einsum("ij,cml->ciljm", eye, W1).reshape(C, 4, 4)
    J = torch.cat([J1, J2], 2)                                        # (C, 4, 8)
    w = sx.repeat(1, 2)                                              # weight s_l for row (i, l)
    H = 2 * k[:, None, None] * (J.transpose(1, 2) * w[:, None, :]) @ J
    E = W2 @ W1 - eye
    # rows W₁[j, l], columns W₂[i, m]: 2K·s_l·E_il·δ_jm
    X = torch.einsum("cil,cl,jm->cjlim", 2 * k[:, None, None] * E, sx, eye).reshape(C, 4, 4)
    H[:, :4, 4:] += X
    H[:, 4:, :4] += X.transpose(1, 2)
    return H


def sharpness(W1: Tensor, W2: Tensor, sx: Tensor, k: Tensor, limit: float = 1e3) -> Tensor:
    """Top eigenvalue of the exact population Hessian per chain; NaN for diverged chains.

    A chain counts as diverged when a weight is non-finite or exceeds ``limit`` in size.
    """
    w = torch.cat([W1.flatten(1), W2.flatten(1)], 1)
    ok = torch.isfinite(w).all(1) & (w.abs().amax(1) < limit)
    z = torch.zeros_like(W1)
    W1s, W2s = torch.where(ok[:, None, None], W1, z), torch.where(ok[:, None, None], W2, z)
    top = torch.linalg.eigvalsh(population_hessian(W1s, W2s, sx, k))[:, -1]
    return torch.where(ok, top, torch.full_like(top, float("nan")))


Streams = torch.Generator | Sequence[tuple[torch.Generator, int]]


def sample_moments(batch: int, sx: Tensor, se: Tensor, generator: Streams,
                   n: int = 1) -> tuple[Tensor, Tensor]:
    """Batch second moments ``S_xx = (1/b)Σ x xᵀ`` and ``S_εx = (1/b)Σ ε xᵀ`` for ``n`` steps × C chains.

    A linear model's batch gradient depends on the batch only through these moments, so one SGD step
    needs one draw of the 4 × 4 scatter of ``z = (x, ε) ~ N(0, diag(s, ε))``: ``b·S ~ Wishart(b, Σ)``.
    For ``b ≥ 4`` it is drawn exactly by the Bartlett decomposition (``A_ii² ~ χ²(b − i + 1)``,
    ``A_ij ~ N(0, 1)`` below the diagonal, ``b·S = L A Aᵀ Lᵀ``): cost independent of ``b``. For
    ``b < 4`` the samples themselves are drawn. ``batch = 0`` means the full batch (``S = Σ``).

    ``generator`` is one random stream for all chains, or a sequence of ``(generator, count)``
    streams whose counts add up to ``C``: consecutive groups of chains, each drawn from its own
    stream. A group's draws then do not depend on which other chains run beside it, so one cell
    of a grid simulated alone gives the numbers it gets inside the batched grid.

    Returns:
        ``S_xx, S_εx`` of shape (n, C, 2, 2) on the device and dtype of ``sx``.
    """
    C, dt, dev = sx.shape[0], sx.dtype, sx.device
    sd = torch.cat([sx, se], 1).sqrt()                                 # (C, 4)
    if batch == 0:
        Sxx = torch.diag_embed(sx).expand(n, C, 2, 2)
        return Sxx, torch.zeros_like(Sxx)
    streams = [(generator, C)] if isinstance(generator, torch.Generator) else list(generator)
    if sum(c for _, c in streams) != C:
        raise ValueError(f"the streams cover {sum(c for _, c in streams)} chains, not {C}")
    if batch < 4:
        z = torch.cat([torch.randn(n, c, batch, 4, generator=gen, dtype=dt) for gen, c in streams],
                      1).to(dev) * sd[:, None, :]
        S = z.transpose(-1, -2) @ z / batch
    else:
        # χ²(ν) = 2·Gamma(ν/2); torch's sampler with an explicit generator (reproducible runs)
        dof = torch.tensor([batch - i for i in range(4)], dtype=dt)
        gam, lows = [], []
        for gen, c in streams:
            gam.append(torch._standard_gamma(dof.expand(n, c, 4) / 2, generator=gen))
            lows.append(torch.randn(n, c, 6, generator=gen, dtype=dt))
        diag = (2 * torch.cat(gam, 1)).sqrt()
        low = torch.cat(lows, 1)
        A = torch.diag_embed(diag)
        rows, cols = torch.tril_indices(4, 4, -1)
        A[..., rows, cols] = low
        LA = sd.cpu()[:, :, None] * A
        S = (LA @ LA.transpose(-1, -2) / batch).to(dev)
    return S[..., :2, :2], S[..., 2:, :2]


def moment_gradients(W1: Tensor, W2: Tensor, Sxx: Tensor, Sex: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Batch gradients from the batch moments: ``G = 2K[(W₂W₁ − I)S_xx − S_εx]``, ``g₁ = W₂ᵀG``, ``g₂ = GW₁ᵀ``.

    Identical to :func:`gradients` on the samples that produced ``S_xx, S_εx`` (``y = x + ε``).
    """
    eye = torch.eye(2, dtype=W1.dtype, device=W1.device)
    G = 2 * k[:, None, None] * ((W2 @ W1 - eye) @ Sxx - Sex)
    return W2.transpose(1, 2) @ G, G @ W1.transpose(1, 2)


def simulate(
    W1: Tensor, W2: Tensor, *, lr: Tensor, k: Tensor, sx: Tensor, se: Tensor, batch: int, steps: int,
    every: int, generator: Streams, advance: Callable[[int], None] | None = None,
    track_charge: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[float, float]]:
    """Online SGD (fresh samples each step) on C chains at once; exact sharpness every ``every`` steps.

    Args:
        W1, W2: (C, 2, 2) starts. lr, k: (C,) learning rate and MSE factor per chain.
        sx, se: (C, 2) input / label-noise variances per chain (``se = 0``: no label noise).
        batch: samples per step ``b`` (0: full batch, i.e. gradient descent on the population loss).
        steps: SGD steps. every: steps between sharpness readings.
        generator: the random stream (CPU; samples are moved to the weights' device), or
            ``(generator, count)`` streams for consecutive groups of chains (see
            :func:`sample_moments`).
        advance: progress callback, called with ``every`` after each reading.
        track_charge: for the first ``track_charge`` steps compare ``Q' − Q`` with
            ``η²(g₁g₁ᵀ − g₂ᵀg₂)`` (exact for any ``η``).

    Returns:
        ``(readings (R, C), charges (R, C, 2, 2), W1, W2, (charge_rel_residual, first_order_rel_error))``
        with ``R = steps // every`` readings of the sharpness and of the charge ``Q``;
        RMS of ``ΔQ − η²(g₁g₁ᵀ − g₂ᵀg₂)`` and of ``ΔQ − 0`` (gradient-flow conservation) relative to the
        RMS of ``η²(g₁g₁ᵀ − g₂ᵀg₂)`` over tracked steps and chains (NaN when nothing was tracked).
        Diverged chains (non-finite or |w| ≥ 1e3) read NaN from then on.

    Raises:
        ValueError: ``steps < every`` (no reading would be taken).
    """
    if steps < every:
        raise ValueError(f"steps = {steps} < hessian_every = {every}: no sharpness reading")
    C = W1.shape[0]
    step = lr[:, None, None]
    readings, charges = [], []
    dead = torch.zeros(C, dtype=torch.bool, device=W1.device)
    res2 = pred2 = dq2 = W1.new_zeros(())
    for t0 in range(0, steps - steps % every, every):
        Sxx, Sex = sample_moments(batch, sx, se, generator, every)
        for s in range(every):
            g1, g2 = moment_gradients(W1, W2, Sxx[s], Sex[s], k)
            if t0 + s < track_charge:
                Q = charge(W1, W2)
            new1, new2 = W1 - step * g1, W2 - step * g2
            if t0 + s < track_charge:
                dQ = charge(new1, new2) - Q
                pred = step**2 * (g1 @ g1.transpose(1, 2) - g2.transpose(1, 2) @ g2)
                fin = (torch.isfinite(dQ) & torch.isfinite(pred)).all(-1).all(-1) & ~dead
                z = torch.zeros_like(dQ)
                dQ, pred = torch.where(fin[:, None, None], dQ, z), torch.where(fin[:, None, None], pred, z)
                res2 = res2 + ((dQ - pred) ** 2).sum()
                pred2 = pred2 + (pred**2).sum()
                dq2 = dq2 + (dQ**2).sum()
            W1, W2 = new1, new2
        lam = sharpness(W1, W2, sx, k)
        dead = dead | torch.isnan(lam)
        lam = torch.where(dead, torch.full_like(lam, float("nan")), lam)
        W1 = torch.where(dead[:, None, None], torch.zeros_like(W1), W1)   # no overflow work on dead chains
        W2 = torch.where(dead[:, None, None], torch.zeros_like(W2), W2)
        readings.append(lam)
        charges.append(torch.where(dead[:, None, None], torch.full_like(W1, float("nan")), charge(W1, W2)))
        if advance is not None:
            advance(every)
    if track_charge and float(pred2) > 0:
        rel = (float(res2.sqrt() / pred2.sqrt()), float(dq2.sqrt() / pred2.sqrt()))
    else:
        rel = (float("nan"), float("nan"))
    return torch.stack(readings), torch.stack(charges), W1, W2, rel
