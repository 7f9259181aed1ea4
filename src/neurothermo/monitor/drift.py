"""The charge-drift identity: a window's mean gradient imbalance is its charge's drift, exactly.

For a rescale symmetry of hidden unit u (incoming weights and bias × e^λ, outgoing weights × e^−λ)
the charge ``J_u = ‖w_u‖² + b_u² − ‖v_u‖²`` changes under one plain SGD step
``θ' = θ − η_t·(g + wd·θ)`` (torch's coupled weight decay ``wd``; the paper's γ = wd/2) by exactly

    J_u(t+1) = c_t·J_u(t) + η_t²·(e_in,u(t) − e_out,u(t)),    c_t = (1 − η_t·wd)²,

with ``e_in = ‖g_{w_u}‖² + g_{b_u}²`` and ``e_out = ‖g_{v_u}‖²`` (the cross terms cancel because the
loss is invariant along the orbit). Summed over the steps t = s … s+T−1 of a window:

    Σ_t η_t²·(e_in − e_out) = J(s+T) − J(s) + Σ_t (1 − c_t)·J(t).

The left side is read from the gradients only, the right side from the parameters only. With a
constant η and wd = 0 it says: the mean imbalance over T steps is the charge's drift divided by
η²T. So a pair of layers is either balanced (E[e_in] = E[e_out], summed over its units) or its
charge is still drifting; with weight decay the stationary balance is
``E[e_in − e_out] = wd·(2 − η·wd)·E[J]/η``, and the measured difference from it is, again exactly,
``(J(s+T) − J(s))/(η²T)``.

:func:`charge_drift` evaluates both sides per unit over a window of a
:class:`~neurothermo.monitor.History` recorded by a ThermoMonitor at *every* step (``every=1``),
plain SGD (``charge_meas`` is the measured change of the last step, so the window can end at the
last step of the run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neurothermo.monitor import names
from neurothermo.monitor.balance import _rescale_indices, block_means
from neurothermo.monitor.history import History

_KAPPA = 2 * (2 + 30)  # ulp of P per step: update rounding + a pairwise sum of <= 2^30 squares, in and out


@dataclass(frozen=True, eq=False)
class ChargeDrift:
    """Both sides of the drift identity for one rescale-symmetric layer over one window.

    Per unit (arrays of length n_units): ``imbalance`` = Σ_t η_t²(e_in − e_out) / Σ_t η_t² (the
    η²-weighted mean imbalance; the plain mean at constant η); ``drift`` = (J(end) − J(start)) /
    Σ_t η_t²; ``decay`` = Σ_t (1 − c_t)·J(t) / Σ_t η_t² (0 without weight decay; at constant η
    it is ``wd(2 − η·wd)·mean J/η``, the stationary imbalance). The identity is
    ``imbalance = drift + decay``; ``error`` = max over units of |imbalance − drift − decay|, and
    ``roundoff`` a bound on it from the floating-point format (see :func:`charge_drift`).
    ``drift_se`` (per unit) and ``pair_drift_se`` (the layer's sum): batch-means standard errors
    over ``n_blocks`` blocks of the per-step series ``η_t²(e_in − e_out) − (1 − c_t)J`` (whose block
    means are the blocks' charge drifts), i.e. how far ``drift`` may be from 0 by fluctuation alone.
    Returned by :func:`charge_drift`.

    Attributes:
        location: the rescale symmetry's location (the hidden layer).
        window: the first and last step of the window (inclusive).
        n_steps: the number of steps in the window.
        imbalance: per unit, ``Σ_t η_t²(e_in − e_out) / Σ_t η_t²``.
        drift: per unit, ``(J(end) − J(start)) / Σ_t η_t²``.
        decay: per unit, ``Σ_t (1 − c_t)·J(t) / Σ_t η_t²`` (0 without weight decay).
        drift_se: per unit, the batch-means standard error of ``drift``.
        pair_drift_se: the same for the layer's sum over units.
        error: ``max_u |imbalance − drift − decay|``.
        roundoff: the floating-point bound on ``error``.
        mean_in: per unit, the η²-weighted mean incoming energy ``e_in``.
        mean_out: per unit, the η²-weighted mean outgoing energy ``e_out``.
        charge: per unit, the mean charge ``J`` over the window.
        n_blocks: the number of blocks of the error estimate.
    """

    location: str
    window: tuple[int, int]  # first and last step of the window (inclusive)
    n_steps: int
    imbalance: np.ndarray
    drift: np.ndarray
    decay: np.ndarray
    drift_se: np.ndarray
    pair_drift_se: float
    error: float
    roundoff: float
    mean_in: np.ndarray  # per unit, η²-weighted like ``imbalance``
    mean_out: np.ndarray
    charge: np.ndarray  # per unit mean J over the window
    n_blocks: int

    @property
    def pair_imbalance(self) -> float:
        return float(self.imbalance.sum())

    @property
    def pair_drift(self) -> float:
        return float(self.drift.sum())

    @property
    def pair_decay(self) -> float:
        return float(self.decay.sum())


def _window_slice(steps: np.ndarray, window: float | tuple[int, int]) -> slice:
    if isinstance(window, tuple):
        a, b = window
        lo, hi = int(np.searchsorted(steps, a)), int(np.searchsorted(steps, b, side="right"))
    else:
        if not 0 < window <= 1:
            raise ValueError(f"window as a fraction must be in (0, 1], got {window}")
        hi = len(steps)
        lo = hi - max(2, math.ceil(window * len(steps)))
    if hi - lo < 2:
        raise ValueError(f"window {window!r} holds {max(hi - lo, 0)} recorded steps; it needs >= 2")
    return slice(max(lo, 0), hi)


def charge_drift(history: History, *, window: float | tuple[int, int] = 0.5, n_blocks: int = 10,
                 weight_decay: float | None = None) -> tuple[ChargeDrift, ...]:
    """Both sides of the charge-drift identity per rescale-symmetric layer (module docstring).

    Args:
        history: recorded by a :class:`~neurothermo.ThermoMonitor` with ``every=1`` on a plain SGD
            run (momentum 0; full-batch GD included) — the columns ``energy_in/out``, ``charge``,
            ``charge_meas``, ``lr`` and ``weight_norm`` of every step of the window.
        window: the fraction of recorded steps at the end, or ``(first, last)`` steps (inclusive).
        n_blocks: batch-means blocks for the standard errors.
        weight_decay: torch's ``wd`` of the run; default: ``history.meta["train"]["weight_decay"]``
            (written by :func:`neurothermo.train`), else 0.

    Returns:
        One :class:`ChargeDrift` per layer with rescale symmetry. ``roundoff`` bounds the
        accumulated rounding: per step, the update rounds each parameter (≤ 2 ulp of the squared
        norm P of all parameters) and J is a sum of n ≤ 2³⁰ squares (≤ 30 ulp of P with pairwise
        summation), on the in and the out side: ``64·ε·Σ_t P_t / Σ_t η_t²`` (linear, worst-case
        accumulation), ε the unit roundoff of the recorded values' dtype (float64: 1.1e-16).

    Raises:
        ValueError: a step of the window was not recorded (``every`` > 1), no lr was recorded, the
            history has no rescale symmetry, or the optimizer was not plain SGD.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> monitor = nt.ThermoMonitor(model, loss_fn, noise_every=None)
        >>> history = nt.train(model, loss_fn, (x, y), lr=0.1, batch_size=8, steps=40, monitor=monitor)
        >>> (cd,) = nt.charge_drift(history, weight_decay=0.0)  # mean imbalance = the charge's drift, exactly
        >>> bool((cd.error <= 10 * cd.roundoff + 1e-6).all())
        True
    """
    notes = " ".join(history.meta.get("notes", []))
    if "charge predictions not recorded" in notes:
        raise ValueError("the charge-drift identity holds for plain SGD steps only (momentum 0, "
                         f"one lr and wd for all parameters); this run: {notes}")
    if names.LR not in history:
        raise ValueError("history has no 'lr' column: bind the monitor to the optimizer or train with "
                         "nt.train, so each step's learning rate is known")
    found = _rescale_indices(history)
    if not found:
        raise ValueError("history has no rescale-symmetric hidden layer (columns energy_in/symN)")
    if weight_decay is None:
        weight_decay = float(history.meta.get("train", {}).get("weight_decay", 0.0))
    layers = history.meta.get("layers", [])
    p_cols = [names.weight_norm(n) for n in layers if names.weight_norm(n) in history]
    out = []
    for i, loc in found:
        steps = history.steps(names.charge(i))
        sl = _window_slice(steps, window)
        st = steps[sl]
        if not np.array_equal(st, np.arange(st[0], st[-1] + 1)):
            raise ValueError(
                f"steps {st[0]}..{st[-1]} were not all recorded: the identity sums every step's "
                "imbalance; record with ThermoMonitor(every=1)")
        e_in = history[names.energy_in(i)][sl].astype(np.float64)
        e_out = history[names.energy_out(i)][sl].astype(np.float64)
        charge = history[names.charge(i)][sl].astype(np.float64)
        end = charge[-1] + history[names.charge_meas(i)][sl][-1].astype(np.float64)
        lr_steps = history.steps(names.LR)
        pos = np.searchsorted(lr_steps, st)
        if not np.array_equal(lr_steps[np.minimum(pos, len(lr_steps) - 1)], st):
            raise ValueError("the 'lr' column misses steps of the window")
        lr2 = history[names.LR][pos].astype(np.float64) ** 2
        c = (1.0 - np.sqrt(lr2) * weight_decay) ** 2
        w = lr2.sum()
        imb_t = lr2[:, None] * (e_in - e_out)
        dec_t = (1.0 - c)[:, None] * charge
        imbalance, decay = imb_t.sum(0) / w, dec_t.sum(0) / w
        drift = (end - charge[0]) / w
        # batch means of the per-step drift η²(e_in − e_out) − (1 − c)J, normalised like the mean
        nb = min(n_blocks, len(st))
        blocks = block_means((imb_t - dec_t) / lr2.mean(), nb)
        drift_se = blocks.std(axis=0, ddof=1) / math.sqrt(nb)
        pair_se = float(blocks.sum(1).std(ddof=1) / math.sqrt(nb))
        dtype = history[names.charge(i)].dtype
        eps = float(np.finfo(dtype).eps) / 2 if np.issubdtype(dtype, np.floating) else 1.1e-16
        if p_cols:
            p_sum = sum(float((history[c_][np.searchsorted(history.steps(c_), st)].astype(
                np.float64) ** 2).sum()) for c_ in p_cols)
        else:  # no layer norms: |J| bounds nothing; use the charges' own scale
            p_sum = float(np.abs(charge).sum())
        roundoff = _KAPPA * eps * p_sum / w
        out.append(ChargeDrift(
            location=loc, window=(int(st[0]), int(st[-1])), n_steps=len(st), imbalance=imbalance,
            drift=drift, decay=decay, drift_se=drift_se, pair_drift_se=pair_se,
            error=float(np.abs(imbalance - drift - decay).max()), roundoff=roundoff,
            mean_in=(lr2[:, None] * e_in).sum(0) / w, mean_out=(lr2[:, None] * e_out).sum(0) / w,
            charge=charge.mean(0), n_blocks=nb))
    return tuple(out)


def _aligned(history: History, col: str, steps: np.ndarray) -> np.ndarray:
    """``col``'s values at ``steps`` (every one of them must be recorded)."""
    have = history.steps(col)
    pos = np.minimum(np.searchsorted(have, steps), len(have) - 1)
    if not np.array_equal(have[pos], steps):
        raise ValueError(f"the '{col}' column misses steps {steps[0]}..{steps[-1]}")
    return np.asarray(history[col], dtype=np.float64)[pos]


def relaxation_count(history: History, *, window: float | tuple[int, int] = 0.5
                     ) -> tuple[float, ...]:
    """Per rescale-symmetric layer pair, the orbit relaxation times the run holds before a window.

    Along a unit's rescale orbit (in-weights and bias × a, out-weights ÷ a) ``e_in ∝ a⁻²`` and
    ``e_out ∝ a²``, so the identity gives ``d ln a ≈ η²(e_in − e_out)/(2S)`` per step and the
    offset from the balance point decays at the rate ``η²(e_in + e_out)/S``. Summed over the pair
    and over the steps before the window's first step ``t_w``:

        R = Σ_{t < t_w} η_t²·(Σ_u e_in,u + Σ_u e_out,u)_t / S_t,

    with ``e`` the minibatch gradient energies of the batch-mean loss as recorded, and ``S`` the
    squared norms (weights and biases) of the modules that own the symmetry's parameters, taken
    at the parameters the step's gradient is taken at.

    Args:
        history: recorded by a :class:`~neurothermo.ThermoMonitor` with ``every=1`` (the columns
            ``energy_in/out``, ``lr`` and ``weight_norm`` of every step before the window).
        window: as in :func:`charge_drift`: the last fraction of the recorded steps, or
            ``(first, last)`` steps.

    Returns:
        One ``R`` per rescale-symmetric layer pair, in the order of :func:`charge_drift`.

    Raises:
        ValueError: no rescale-symmetric layer, a history without the symmetries' parameter names
            (recorded by an older monitor), or steps missing before the window.

    Example:
        >>> import torch, neurothermo as nt
        >>> from neurothermo.monitor.drift import relaxation_count
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss = torch.nn.functional.cross_entropy
        >>> mon = nt.ThermoMonitor(model, loss, every=1, noise_every=None)
        >>> h = nt.train(model, loss, (x, y), lr=0.1, batch_size=4, steps=40, monitor=mon)
        >>> r = relaxation_count(h, window=0.5)
        >>> len(r), r[0] > 0
        (1, True)
    """
    found = _rescale_indices(history)
    if not found:
        raise ValueError("history has no rescale-symmetric hidden layer (columns energy_in/symN)")
    syms = history.meta.get("symmetries") or []
    out = []
    for i, loc in found:
        params = syms[i].get("params") if i < len(syms) else None
        if not params:
            raise ValueError(f"history does not name the parameters of symmetry {i} ({loc}): record "
                             "it with this version's ThermoMonitor")
        steps = history.steps(names.energy_in(i))
        before = steps[:_window_slice(steps, window).start]
        if len(before) == 0:
            out.append(0.0)
            continue
        if not np.array_equal(before, np.arange(before[0], before[-1] + 1)):
            raise ValueError(f"steps {before[0]}..{before[-1]} were not all recorded: R sums every "
                             "step before the window; record with ThermoMonitor(every=1)")
        n = len(before)
        e = (np.asarray(history[names.energy_in(i)], dtype=np.float64)[:n].sum(1)
             + np.asarray(history[names.energy_out(i)], dtype=np.float64)[:n].sum(1))
        owners = dict.fromkeys(p.rpartition(".")[0] or "(root)" for p in params)
        gross = sum((_aligned(history, names.weight_norm(m), before) ** 2 for m in owners),
                    np.zeros(n))
        lr2 = _aligned(history, names.LR, before) ** 2
        out.append(float((lr2 * e / gross).sum()))
    return tuple(out)
