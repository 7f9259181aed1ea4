"""Layer balance and neuron balance: the quantities of the paper's Figure 2 (docs/theory.md §2, §5.2).

Both summaries read a :class:`~neurothermo.monitor.History` written by a ThermoMonitor and average
over a window of recorded steps at the end of the run (by default its second half), because the
theory's statement is about expectations over SGD's stationary distribution:

* **layer balance** — ``E‖g_k‖²``, the expected squared norm of layer k's minibatch gradient (all the
  parameters the layer owns), and the ratios ``E‖g_k‖² / E‖g_{k+1}‖²`` between consecutive layers.
  For every hidden layer with rescale symmetry (a detected ``"rescale"`` symmetry, or a
  ``"double_rotation"``, which contains it) also the exact pair:
  ``Σ_u E[‖g_{w_u}‖² + g_{b_u}²]`` (incoming weights and biases) against ``Σ_u E‖g_{u_u}‖²``
  (outgoing weights), whose ratio is 1 at the entropic equilibrium of SGD without weight decay.
* **neuron balance** — per hidden unit u the incoming energy ``E[‖g_{w_u}‖² + g_{b_u}²]`` against the
  outgoing energy ``E‖g_{u_u}‖²``; at balance the units lie on the diagonal.

Error estimates: recorded steps are autocorrelated, so standard errors come from *batch means*: the
window is cut into ``n_blocks`` consecutive blocks, and the standard error of a mean is
``std(block means, ddof=1)/√n_blocks``; ratios of means use the delta method on the block means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neurothermo.monitor import names
from neurothermo.monitor.history import History


@dataclass(frozen=True, eq=False)
class LayerBalance:
    """Expected squared gradient norms per layer and the ratios between consecutive layers.

    Returned by :func:`layer_balance`. ``g_k`` is layer k's minibatch gradient (of the
    mean-reduced loss, without weight decay); ``E`` a time average over the window; each ``*_se``
    a batch-means standard error.

    Attributes:
        layers: the layer names (module paths owning parameters), input first.
        sq_norm: ``[L]`` ``E‖g_k‖²``.
        sq_norm_se: its standard errors.
        ratio: ``[L−1]`` ``E‖g_k‖² / E‖g_{k+1}‖²``.
        ratio_se: their delta-method standard errors.
        residual: ``[L−1]`` ``(E_k − E_{k+1}) / (E_k + E_{k+1})``.
        pairs: locations of the rescale-symmetric hidden layers.
        pair_in: per pair ``Σ_u E[‖g_{w_u}‖² + g_{b_u}²]`` (incoming weights and biases).
        pair_out: per pair ``Σ_u E‖g_{u_u}‖²`` (outgoing weights).
        pair_ratio: ``pair_in / pair_out``: 1 at balance.
        pair_ratio_se: its standard errors.
        window: the first and last step averaged over.
        n_steps: the number of recorded steps in the window.
        n_blocks: the number of blocks of the error estimate.
    """

    layers: tuple[str, ...]
    sq_norm: np.ndarray  # [L] E‖g_k‖², time average over the window
    sq_norm_se: np.ndarray
    ratio: np.ndarray  # [L−1] E‖g_k‖² / E‖g_{k+1}‖²
    ratio_se: np.ndarray
    residual: np.ndarray  # [L−1] (E_k − E_{k+1}) / (E_k + E_{k+1})
    pairs: tuple[str, ...]  # locations of the rescale-symmetric hidden layers
    pair_in: np.ndarray  # Σ_u E[incoming energy]
    pair_out: np.ndarray  # Σ_u E[outgoing energy]
    pair_ratio: np.ndarray  # pair_in / pair_out: 1 at balance
    pair_ratio_se: np.ndarray
    window: tuple[int, int]  # first and last step averaged over
    n_steps: int
    n_blocks: int


@dataclass(frozen=True, eq=False)
class NeuronBalance:
    """Incoming vs outgoing gradient energy per hidden unit of one rescale-symmetric layer.

    ``slope`` is the least-squares line through the origin ``out ≈ slope·in`` (1 at balance);
    ``correlation`` the Pearson correlation across units (``None`` when the units' energies have no
    spread); ``log_slope`` / ``log_correlation`` the same with an intercept in log–log space over
    units whose two energies are positive (the scatter of Figure 2 spans decades);
    ``residual = Σ_u |in − out| / Σ_u (in + out)``: 0 at balance. Each statistic is computed from
    the window means, and its ``*_se`` from the spread of the same statistic over the ``n_blocks``
    block means (batch means: ``std/√n_blocks``), i.e. the error from the finite time average.
    Returned by :func:`neuron_balance`.

    Attributes:
        location: the rescale symmetry's location (the hidden layer).
        energy_in: ``[units]`` ``E[‖g_{w_u}‖² + g_{b_u}²]``.
        energy_in_se: its standard errors.
        energy_out: ``[units]`` ``E‖g_{u_u}‖²``.
        energy_out_se: its standard errors.
        slope: ``out ≈ slope·in`` through the origin.
        slope_se: its standard error.
        correlation: Pearson correlation across units, or None.
        correlation_se: its standard error, or None.
        log_slope: the log–log slope, or None.
        log_slope_se: its standard error, or None.
        log_correlation: the log–log correlation, or None.
        residual: ``Σ_u |in − out| / Σ_u (in + out)``.
        residual_se: its standard error.
        window: the first and last step averaged over.
        n_steps: the number of recorded steps in the window.
        n_blocks: the number of blocks of the error estimate.
    """

    location: str
    energy_in: np.ndarray
    energy_in_se: np.ndarray
    energy_out: np.ndarray
    energy_out_se: np.ndarray
    slope: float
    slope_se: float
    correlation: float | None
    correlation_se: float | None
    log_slope: float | None
    log_slope_se: float | None
    log_correlation: float | None
    residual: float
    residual_se: float
    window: tuple[int, int]
    n_steps: int
    n_blocks: int


def block_means(x: np.ndarray, n_blocks: int) -> np.ndarray:
    """Means of ``n_blocks`` consecutive, (nearly) equal blocks along axis 0."""
    return np.stack([b.mean(axis=0) for b in np.array_split(x, n_blocks, axis=0)])


def _se(blocks: np.ndarray) -> np.ndarray:
    result: np.ndarray = blocks.std(axis=0, ddof=1) / math.sqrt(blocks.shape[0])
    return result


def _ratio_se(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ratio of means of block series a, b [n_blocks, ...] and its delta-method standard error."""
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    n = a.shape[0]
    va, vb = a.var(axis=0, ddof=1) / n, b.var(axis=0, ddof=1) / n
    cov = ((a - ma) * (b - mb)).sum(axis=0) / (n - 1) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ma / mb
        var = r**2 * (va / ma**2 + vb / mb**2 - 2 * cov / (ma * mb))
    return r, np.sqrt(np.maximum(var, 0.0))


def _window(history: History, column: str, window: float | int) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``column`` in the window (a fraction of the recorded steps, or a start step)."""
    steps, vals = history.steps(column), history[column]
    if isinstance(window, bool) or not isinstance(window, int | float):
        raise TypeError(f"window must be a fraction in (0, 1] or an int start step, got {window!r}")
    if isinstance(window, float):
        if not 0 < window <= 1:
            raise ValueError(f"window as a fraction must be in (0, 1], got {window}")
        keep = max(1, math.ceil(window * len(steps)))
        start = len(steps) - keep
    else:
        start = int(np.searchsorted(steps, window))
    return steps[start:], vals[start:]


def _check_blocks(column: str, n: int, n_blocks: int) -> int:
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 2:
        raise ValueError(f"n_blocks must be an int >= 2, got {n_blocks!r}")
    if n < 2:
        raise ValueError(
            f"column {column!r} has {n} recorded step(s) in the window; a mean with an error "
            "estimate needs at least 2 (record more steps or widen window=)"
        )
    return min(n_blocks, n)


def _layers(history: History) -> list[str]:
    layers = history.meta.get("layers")
    if layers is None:
        prefix = names.grad_sq("")
        layers = [c[len(prefix):] for c in history.columns if c.startswith(prefix)]
    if not layers:
        raise ValueError(
            "history has no per-layer gradient norms (columns 'grad_sq/<layer>'); record them "
            "with a ThermoMonitor"
        )
    return list(layers)


def _rescale_indices(history: History) -> list[tuple[int, str]]:
    syms = history.meta.get("symmetries")
    if syms is None:  # a history without meta: every energy_in column is a rescale layer
        prefix = names.energy_in(0)[: -len("0")]
        idx = sorted(int(c[len(prefix):]) for c in history.columns if c.startswith(prefix))
        return [(i, names.sym(i)) for i in idx]
    return [(i, s.get("location", names.sym(i))) for i, s in enumerate(syms)
            if names.energy_in(i) in history]


def layer_balance(history: History, *, window: float | int = 0.5, n_blocks: int = 10) -> LayerBalance:
    """Summarise layer balance over the last ``window`` of the run (see the module docstring).

    ``window`` is the fraction of recorded steps at the end to average over, or an int: the first
    step of the window. ``n_blocks`` sets the batch-means error estimate.

    Args:
        history: the :class:`History` of a run recorded by a :class:`ThermoMonitor`.
        window: the fraction in (0, 1] of recorded steps at the end to average over, or an int:
            the first step of the window.
        n_blocks: the number of consecutive blocks (≥ 2) of the batch-means error estimate.

    Returns:
        A :class:`LayerBalance` with ``E‖g_k‖²`` per layer, the consecutive ratios and, per
        rescale-symmetric hidden layer, the exact incoming/outgoing pair, each with standard
        errors.

    Raises:
        TypeError: ``window`` neither a float nor an int.
        ValueError: no per-layer columns in ``history``, columns recorded at different steps,
            ``window`` outside (0, 1], ``n_blocks`` < 2 or not an int, fewer than 2 recorded steps
            in the window.
        KeyError: a column the monitor should have written is missing.

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
        >>> bal = nt.layer_balance(history)  # mean over the last half of the run
        >>> bal.layers, bal.pair_ratio.shape
        (('0', '2'), (1,))
    """
    layers = _layers(history)
    cols = [names.grad_sq(n) for n in layers]
    win = [_window(history, c, window) for c in cols]
    steps0 = win[0][0]
    for c, (s, _) in zip(cols, win):
        if not np.array_equal(s, steps0):
            raise ValueError(f"column {c!r} was recorded at other steps than {cols[0]!r}")
    nb = _check_blocks(cols[0], len(steps0), n_blocks)
    blocks = np.stack([block_means(v.astype(np.float64), nb) for _, v in win], axis=1)  # [nb, L]
    sq = blocks.mean(axis=0)
    ratio, ratio_se = _ratio_se(blocks[:, :-1], blocks[:, 1:])
    residual = (sq[:-1] - sq[1:]) / (sq[:-1] + sq[1:])

    pairs, p_in, p_out = [], [], []
    for i, loc in _rescale_indices(history):
        s_in, e_in = _window(history, names.energy_in(i), window)
        _, e_out = _window(history, names.energy_out(i), window)
        nbi = _check_blocks(names.energy_in(i), len(s_in), n_blocks)
        p_in.append(block_means(e_in.astype(np.float64).sum(axis=1), nbi))
        p_out.append(block_means(e_out.astype(np.float64).sum(axis=1), nbi))
        pairs.append(loc)
    pr, pr_se = zip(*(_ratio_se(a, b) for a, b in zip(p_in, p_out))) if pairs else ((), ())
    return LayerBalance(
        layers=tuple(layers), sq_norm=sq, sq_norm_se=_se(blocks), ratio=ratio, ratio_se=ratio_se,
        residual=residual, pairs=tuple(pairs),
        pair_in=np.array([a.mean() for a in p_in]), pair_out=np.array([b.mean() for b in p_out]),
        pair_ratio=np.array(pr, dtype=np.float64), pair_ratio_se=np.array(pr_se, dtype=np.float64),
        window=(int(steps0[0]), int(steps0[-1])), n_steps=len(steps0), n_blocks=nb,
    )


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2:
        return None
    sx, sy = x.std(), y.std()
    if sx == 0 or sy == 0:
        return None
    return float(((x - x.mean()) * (y - y.mean())).mean() / (sx * sy))


def fit_units(e_in: np.ndarray, e_out: np.ndarray) -> dict[str, float | None]:
    """Slope through the origin, correlations and residual of per-unit energies (pure function).

    ``slope = Σ in·out / Σ in²``; ``correlation`` Pearson; ``log_slope`` the least-squares slope of
    ``log out`` on ``log in`` (with intercept) over units with both energies > 0;
    ``residual = Σ|in − out| / Σ(in + out)``.
    """
    sxx = float((e_in**2).sum())
    if sxx == 0:
        raise ValueError("every unit has zero incoming gradient energy (dead layer?); no slope")
    pos = (e_in > 0) & (e_out > 0)
    lx, ly = np.log(e_in[pos]), np.log(e_out[pos])
    log_r = _pearson(lx, ly)
    log_slope = None
    if log_r is not None:
        dx = lx - lx.mean()
        log_slope = float((dx * (ly - ly.mean())).sum() / (dx**2).sum())
    return {"slope": float((e_in * e_out).sum() / sxx), "correlation": _pearson(e_in, e_out),
            "log_slope": log_slope, "log_correlation": log_r,
            "residual": float(np.abs(e_in - e_out).sum() / (e_in + e_out).sum())}


def _block_se(fits: list[dict[str, float | None]], key: str) -> float | None:
    vals = [float(v) for f in fits if (v := f[key]) is not None]
    if len(vals) < 2:
        return None
    return float(np.std(vals, ddof=1) / math.sqrt(len(vals)))


def _inf_if_none(x: float | None) -> float:
    return math.inf if x is None else x


def neuron_balance(
    history: History, *, window: float | int = 0.5, n_blocks: int = 10
) -> tuple[NeuronBalance, ...]:
    """One :class:`NeuronBalance` per rescale-symmetric hidden layer, averaged over ``window``.

    Args:
        history: the :class:`History` of a run recorded by a :class:`ThermoMonitor`.
        window: the fraction in (0, 1] of recorded steps at the end to average over, or an int:
            the first step of the window.
        n_blocks: the number of consecutive blocks (≥ 2) of the batch-means error estimate.

    Returns:
        One :class:`NeuronBalance` per rescale symmetry the monitor recorded, in its order.

    Raises:
        TypeError: ``window`` neither a float nor an int.
        ValueError: no per-unit energy columns in ``history`` (no rescale symmetry), ``window``
            outside (0, 1], ``n_blocks`` < 2 or not an int, fewer than 2 recorded steps in the
            window.
        KeyError: a column the monitor should have written is missing.

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
        >>> (nb,) = nt.neuron_balance(history)  # one per rescale symmetry (the ReLU's 8 units)
        >>> nb.energy_in.shape  # E‖incoming‖² per unit over the window (numpy)
        (8,)
    """
    found = _rescale_indices(history)
    if not found:
        raise ValueError(
            "history has no per-unit gradient energies (columns 'energy_in/symN'); they are "
            "recorded by a ThermoMonitor for detected 'rescale' symmetries (hidden units between "
            "ReLU / leaky-ReLU / linear layers). Does the model have any?"
        )
    out = []
    for i, loc in found:
        s, e_in = _window(history, names.energy_in(i), window)
        _, e_out = _window(history, names.energy_out(i), window)
        nb = _check_blocks(names.energy_in(i), len(s), n_blocks)
        b_in = block_means(e_in.astype(np.float64), nb)
        b_out = block_means(e_out.astype(np.float64), nb)
        m_in, m_out = b_in.mean(axis=0), b_out.mean(axis=0)
        fit = fit_units(m_in, m_out)
        blocks = [fit_units(a, b) for a, b in zip(b_in, b_out) if (a > 0).any()]
        out.append(NeuronBalance(
            location=loc, energy_in=m_in, energy_in_se=_se(b_in), energy_out=m_out,
            energy_out_se=_se(b_out), slope=fit["slope"],  # type: ignore[arg-type]
            slope_se=_inf_if_none(_block_se(blocks, "slope")), correlation=fit["correlation"],
            correlation_se=_block_se(blocks, "correlation"), log_slope=fit["log_slope"],
            log_slope_se=_block_se(blocks, "log_slope"), log_correlation=fit["log_correlation"],
            residual=fit["residual"],  # type: ignore[arg-type]
            residual_se=_inf_if_none(_block_se(blocks, "residual")),
            window=(int(s[0]), int(s[-1])), n_steps=len(s), n_blocks=nb,
        ))
    return tuple(out)
