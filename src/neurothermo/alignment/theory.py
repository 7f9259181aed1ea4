"""The predicted universal kernel K* of docs/theory.md §3 and the distance of a layer's Gram matrix to it.

Embedded deep linear networks trained by SGD on ``y = V*x + ε`` (``Cov x = Σ_x``, label noise
``Cov ε = Σ_ε ≻ 0`` independent of ``x``, MSE, no weight decay) reach, at the entropic equilibrium,
hidden representations whose Gram matrices satisfy ``h(x₁)ᵀh(x₂) ∝ x₁ᵀ K* x₂`` for every layer, with

    K* = Σ_x^{-1/2} (Σ_x^{1/2} V*ᵀ Σ_ε V* Σ_x^{1/2})^{1/2} Σ_x^{-1/2},

the unique symmetric positive semi-definite solution of ``K* Σ_x K* = V*ᵀ Σ_ε V*``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from neurothermo.alignment._common import as_features, check_pair


def _sym_matrix(x: Any, name: str, size: int | None = None) -> Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.ndim == 1:
        t = torch.diag(t)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{name} must be a square matrix (or a 1-D diagonal), got shape {tuple(t.shape)}")
    if size is not None and t.shape[0] != size:
        raise ValueError(f"{name} is {t.shape[0]}×{t.shape[0]} but must be {size}×{size}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    scale = float(t.abs().max()) or 1.0
    if not torch.allclose(t, t.T, rtol=0.0, atol=1e-10 * scale):
        raise ValueError(f"{name} must be symmetric (a covariance matrix)")
    return (t + t.T) / 2


def _pd_power(t: Tensor, power: float, name: str) -> Tensor:
    w, v = torch.linalg.eigh(t)
    if not bool(w.min() > 1e-12 * w.abs().max().clamp_min(1e-300)):
        raise ValueError(
            f"{name} must be positive definite (smallest eigenvalue {float(w.min()):.3g}); "
            + ("without label noise the theory predicts no unique kernel"
               if name == "sigma_eps" else "drop degenerate input directions first")
        )
    result: Tensor = (v * w.pow(power)) @ v.T
    return result


def _psd_sqrt(t: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((t + t.T) / 2)
    result: Tensor = (v * w.clamp_min(0.0).sqrt()) @ v.T
    return result


def platonic_kernel(sigma_x: Any, v: Any, sigma_eps: Any) -> Tensor:
    """``K* = Σ_x^{-1/2} (Σ_x^{1/2} Vᵀ Σ_ε V Σ_x^{1/2})^{1/2} Σ_x^{-1/2}`` (float64, ``(d_in, d_in)``).

    ``sigma_x``: input covariance ``(d_in, d_in)`` (or its diagonal), positive definite; ``v``: the
    teacher ``V*`` of shape ``(d_out, d_in)`` (``y = V*x + ε``); ``sigma_eps``: label-noise covariance
    ``(d_out, d_out)`` (or its diagonal), positive definite. Defined up to the overall scale that the
    theory leaves free (``∝``); here the formula's own scale. Example: diagonal ``Σ_x = diag(σ)``,
    ``V = diag(v)``, ``Σ_ε = diag(ε)`` give ``K* = diag(|v|·√ε/√σ)``.

    Args:
        sigma_x: ``Σ_x``, ``(d_in, d_in)`` or its diagonal, symmetric positive definite.
        v: the teacher ``V*``, ``(d_out, d_in)``.
        sigma_eps: ``Σ_ε``, ``(d_out, d_out)`` or its diagonal, symmetric positive definite.

    Returns:
        ``K*``, ``(d_in, d_in)`` float64.

    Raises:
        ValueError: a matrix of the wrong shape, not symmetric, not positive definite, or with
            NaN/Inf.

    Example:
        >>> import torch
        >>> from neurothermo.alignment import platonic_kernel
        >>> platonic_kernel(torch.tensor([1.0, 4.0]), torch.diag(torch.tensor([2.0, 1.0])),
        ...                 torch.tensor([1.0, 1.0]))  # diag(|v|·√ε/√σ)
        tensor([[2.0000, 0.0000],
                [0.0000, 0.5000]], dtype=torch.float64)
    """
    vt = torch.as_tensor(v).to(torch.float64)
    if vt.ndim != 2:
        raise ValueError(f"v must be the (d_out, d_in) teacher matrix, got shape {tuple(vt.shape)}")
    if not bool(torch.isfinite(vt).all()):
        raise ValueError("v contains NaN or Inf")
    d_out, d_in = vt.shape
    sx = _sym_matrix(sigma_x, "sigma_x", d_in)
    se = _sym_matrix(sigma_eps, "sigma_eps", d_out)
    _pd_power(se, 1.0, "sigma_eps")  # positive-definiteness check
    sx_half = _pd_power(sx, 0.5, "sigma_x")
    sx_mhalf = _pd_power(sx, -0.5, "sigma_x")
    inner = sx_half @ vt.T @ se @ vt @ sx_half
    k = sx_mhalf @ _psd_sqrt(inner) @ sx_mhalf
    return (k + k.T) / 2


def kernel_distance(features: Any, inputs: Any, K: Any) -> float:
    """``‖G/‖G‖_F − G*/‖G*‖_F‖_F`` with ``G = F Fᵀ`` (the layer's Gram) and ``G* = X K Xᵀ``.

    ``features`` ``F``: ``(N, D)`` hidden representations of the ``N`` inputs ``X``: ``(N, d)``;
    ``K``: ``(d, d)`` symmetric (e.g. :func:`platonic_kernel`). The Gram matrices are uncentred
    (docs/theory.md §3 states the claim for raw inner products) and Frobenius-normalised, so the distance
    is invariant to rotations and scaling of the features; it is ``√(2 − 2 cos(G, G*))``, 0 iff
    ``G ∝ G*``, at most ``√2`` for positive semi-definite ``K``. Computed in feature space
    (``O(N·D·d)``, no ``N × N`` matrix) in float64.

    Args:
        features: ``F``, ``(N, D)``.
        inputs: ``X``, ``(N, d)``, the same samples in the same order.
        K: ``(d, d)`` symmetric (or its diagonal).

    Returns:
        The distance, in [0, √2] for positive semi-definite ``K``.

    Raises:
        TypeError: features or inputs that are not real tensors or arrays.
        ValueError: shapes that do not fit, NaN/Inf, a ``K`` that is not symmetric, all-zero
            features, or a zero predicted Gram matrix.

    Example:
        >>> import torch
        >>> from neurothermo.alignment import kernel_distance
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(30, 3)
        >>> K = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> F = 5.0 * X @ K.sqrt()  # G = F Fᵀ ∝ X K Xᵀ
        >>> kernel_distance(F, X, K) < 1e-6
        True
    """
    f = as_features(features, "features").to(torch.float64)
    x = as_features(inputs, "inputs").to(torch.float64)
    check_pair(f, x, "features", "inputs")
    k = _sym_matrix(K, "K", x.shape[1]).to(x.device)
    m = f.T @ x  # (D, d)
    cross = ((m @ k) * m).sum()  # ⟨G, G*⟩ = tr(Fᵀ X K Xᵀ F)
    g = torch.sqrt((f.T @ f).square().sum())
    kc = k @ (x.T @ x)
    g_star = torch.sqrt((kc * kc.T).sum().clamp_min(0.0))  # ‖X K Xᵀ‖_F² = tr((K C)²)
    if not bool(g > 0):
        raise ValueError("features are all zero; their Gram matrix cannot be normalised")
    if not bool(g_star > 0):
        raise ValueError("the predicted Gram matrix X K Xᵀ is zero (K = 0 or K ⟂ the inputs)")
    cos = (cross / (g * g_star)).clamp(-1.0, 1.0)
    return float(torch.sqrt((2.0 - 2.0 * cos).clamp_min(0.0)))
