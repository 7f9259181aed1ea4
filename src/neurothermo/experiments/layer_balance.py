"""``layer-balance``: gradient balance of MLPs at every depth, and what stops it (Fig. 2).

Rescaling hidden unit u (incoming weights and bias × e^λ, outgoing weights × e^−λ) leaves the
function of a network with positively homogeneous units (ReLU, leaky ReLU, |x|) unchanged, so
one plain SGD step ``θ' = θ − η(g + wd·θ)`` changes its charge
``J_u = ‖w_u‖² + b_u² − ‖v_u‖²`` by exactly ``J' = (1 − η·wd)²J + η²(e_in − e_out)`` with
``e_in = ‖g_{w_u}‖² + g_{b_u}²`` (biases on the incoming side) and ``e_out = ‖g_{v_u}‖²``; wd is
torch's (penalty (wd/2)‖θ‖², the paper's γ = wd/2). Summed over a window of T steps
(:func:`neurothermo.monitor.drift.charge_drift`):

* wd = 0: **mean imbalance = ΔJ/(η²T)**, exactly. A pair of layers (Σ over its units) is balanced,
  ``E[e_in] = E[e_out]``, exactly when its charge has stopped drifting.
* wd > 0: **E[e_in − e_out] = wd(2 − η·wd)·E[J]/η + ΔJ/(η²T)**; at stationarity the last term
  vanishes, per unit.

The experiment trains ``nn.Sequential`` MLPs (float64, so the identity holds to round-off)
with batch size 1 on MNIST (IDX files in ``mnist_dir``) or scikit-learn digits (top ``pca``
principal components, whitened), all started off balance (every hidden unit's in-weights × s,
out-weights ÷ s: the same function), and checks:

1. **deep runs** (``hidden``, biases, ``activation`` = ReLU by default, MSE and cross-entropy,
   wd = 0): the drift identity per pair and per unit, to the round-off bound. With ReLU their
   balance ratio is recorded next to the charge drift that accounts for it and the units'
   activity, not claimed: the charges keep drifting as the units sparsify (measured up to 10⁶
   steps over η, width, depth 2–3, MSE and cross-entropy, with and without ``label_noise``; see
   docs/experiments/layer-balance.md).
2. **stationary reference** (one hidden layer, no biases, MSE on centred inputs — every unit active
   on about half the samples whatever its scale, so nothing feeds the charge): layer balance
   (ratio 1) and neuron balance (slope 1) within 3 batch-means standard errors. Controls on the
   same start: full-batch **GD** and SGD with a **10× smaller η** (relaxation ∝ η²) — the identity
   holds, and balance is not caused: the balance claim has the premise that the orbits relaxed
   (R ≥ 3 relaxation times before the window, R = Σ_t η²(Σe_in + Σe_out)/S), which the controls
   fail. Their ratio is recorded, not used: GD's can land at 1 by chance (measured, one seed in
   five).
3. **weight decay at depth** (the deep net, MSE, ``weight_decay``): the stationary law per pair and
   per unit (scatter against the diagonal); wd bounds the weights, so J relaxes at rate ≈ 2η·wd and
   stops drifting. Controls: the same law on the first relaxation time of the run (J not yet
   stationary) fails; the wd run is off wd = 0 balance.
4. **deep balance runs** (the same biased deep net with ``balance_activation`` = |x|, label
   noise, MSE and cross-entropy): |x| passes gradient through every unit on every sample, so no
   active set shrinks and J becomes stationary; layer balance of every pair and neuron balance
   within 3 SE after R ≥ 3 relaxation times, with full-batch GD (clean labels) and η/10
   controls that must fail (R < 3).

Standard errors are batch means over ``n_blocks`` blocks; by the identity the block means of the
imbalance are the blocks' charge drifts, so "within 3 SE" means "no more drift than the charge's
own fluctuations" (3 SE: 0.3 % false failures for a normal mean; the per-unit check uses a
Bonferroni z over the units).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo.config import setting
from neurothermo.experiments.base import Experiment, RunContext, register
from neurothermo.experiments.layer_balance_model import (  # noqa: F401 (re-exported for tests)
    Abs,
    accuracy,
    activity,
    build_model,
    make_activation,
)
from neurothermo.monitor.history import History


@dataclass(frozen=True)
class LayerBalanceConfig:
    mnist_dir: str = setting("", "folder with the MNIST IDX files (train split); empty: scikit-learn digits")
    mnist_limit: int = setting(10_000, "MNIST training images used (the first n)", min=100, max=60_000)
    pca: int = setting(16, "inputs: the top k principal components, whitened; 0: raw pixels in [0, 1]",
                       min=0, max=784)
    hidden: tuple[int, ...] = setting((16, 16), "hidden widths of the deep ReLU MLP (2–4 layers)",
                                      min=1, max=4096)
    bias: bool = setting(True, "biases in the deep MLP's Linear layers")
    activation: str = setting("relu", "activation of the deep runs (deep MSE/CE, deep + wd): 'relu', "
                              "'leaky_relu:<slope>' (slope in [0, 1)) or 'abs' (|x|); all positively "
                              "homogeneous, so the rescale symmetry and the identity hold")
    losses: tuple[str, ...] = setting(("mse", "ce"), "losses of the deep wd = 0 runs: 'mse' "
                                      "(½‖f − onehot(y)‖², batch mean) and/or 'ce' (cross-entropy)",
                                      choices=("mse", "ce"))
    lr: float = setting(0.1, "learning rate η (the small-η control uses lr × small_lr)", min=1e-6, max=10.0)
    label_noise: float = setting(0.0, "deep wd = 0 runs: each sample's label replaced, with this "
                                 "probability and afresh at every step, by a uniformly random class "
                                 "(keeps the gradient noise stationary; measured to bring the deep "
                                 "pairs closer to balance, not to stop their drift)", min=0.0, max=1.0)
    ce_lr: float = setting(0.02, "η of the cross-entropy run (at η = 0.1, b = 1 cross-entropy kills every "
                           "ReLU unit within ~20k steps: loss → ln 10, measured)", min=1e-6, max=10.0)
    batch_size: int = setting(1, "minibatch size b of the SGD runs", min=1, max=60_000)
    steps: int = setting(3000, "steps of each deep wd = 0 run", min=100)
    ref_hidden: int = setting(64, "width of the one-hidden-layer, bias-free reference", min=1, max=4096)
    ref_steps: int = setting(6000, "steps of the reference run and its two controls", min=100)
    small_lr: float = setting(0.1, "factor on lr for the small-η control", min=1e-4, max=0.5)
    weight_decay: float = setting(0.01, "wd of the weight-decay run (torch's; paper γ = wd/2)",
                                  min=1e-6, max=1.0)
    wd_steps: int = setting(4000, "steps of the weight-decay run", min=100)
    init_scale: float = setting(0.5, "start: hidden units' in-weights × s, out-weights ÷ s", min=1e-3,
                                max=1e3)
    window: float = setting(0.5, "fraction of each run at the end averaged over", min=0.05, max=1.0)
    n_blocks: int = setting(10, "batch-means blocks for the standard errors", min=4, max=200)
    balance_activation: str = setting("abs", "activation of the deep balance runs (same forms as "
                                      "activation): |x| passes gradient through every unit on every "
                                      "sample, so no active set shrinks and J becomes stationary (measured; "
                                      "ReLU and leaky_relu:0.1 do not within 3·10⁵ steps)")
    balance_losses: tuple[str, ...] = setting(("mse", "ce"), "losses of the deep balance runs",
                                              choices=("mse", "ce"))
    balance_lr: float = setting(0.1, "η of the deep balance MSE run and its controls", min=1e-6, max=10.0)
    balance_ce_lr: float = setting(0.04, "η of the deep balance cross-entropy run (relaxation ∝ η²: "
                                   "0.02 learns best but its J still drifts after 3·10⁵ steps; 0.05 "
                                   "balances but barely learns; measured)", min=1e-6, max=10.0)
    balance_label_noise: float = setting(0.1, "label noise of the deep balance runs (cross-entropy "
                                         "without it grows the weights without bound on separable "
                                         "data: at η = 0.05 the |x| network overflows, measured)",
                                         min=0.0, max=1.0)
    balance_steps: int = setting(10_000, "steps of each deep balance run and of its two controls", min=100)

    def check(self) -> None:
        if self.mnist_dir and not Path(self.mnist_dir).is_dir():
            raise ValueError(f"mnist_dir={self.mnist_dir!r} is not a folder; give the folder holding "
                             "the MNIST IDX files, or leave it empty for scikit-learn digits")
        for name in ("losses", "balance_losses"):
            v = getattr(self, name)
            if not v or len(set(v)) != len(v):
                raise ValueError(f"{name}={v}: list 'mse' and/or 'ce' once each")
        for name in ("activation", "balance_activation"):
            try:
                make_activation(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if not 2 <= len(self.hidden) <= 4:
            raise ValueError(f"hidden={self.hidden}: the deep runs need 2 to 4 hidden layers")
        tau = 1 / (self.lr * self.weight_decay * (2 - self.lr * self.weight_decay))
        if self.wd_steps * (1 - self.window) < 3 * tau:
            raise ValueError(
                f"wd_steps={self.wd_steps}: with wd the charge relaxes in τ = 1/(η·wd(2 − η·wd)) = "
                f"{tau:.0f} steps, and the window must start after 3τ (the start's deviation "
                f"× e^-3) to be stationary; raise wd_steps to >= {math.ceil(3 * tau / (1 - self.window))}"
                " or raise weight_decay")
        for name in ("steps", "ref_steps", "wd_steps", "balance_steps"):
            if getattr(self, name) * self.window < 4 * self.n_blocks:
                raise ValueError(f"{name}={getattr(self, name)}: the window holds fewer than 4 steps per "
                                 f"block (n_blocks={self.n_blocks}); raise {name} or lower n_blocks")


# ---- data, model, losses (pure functions) -----------------------------------------------------

def whiten(x: Tensor, k: int) -> Tensor:
    """``(x − mean) V_k / √λ_k``: the top-k principal components with unit variance each (float64 SVD)."""
    if k > x.shape[1]:
        raise ValueError(f"pca={k} exceeds the input dimension {x.shape[1]}; use pca <= {x.shape[1]}")
    xc = x.double() - x.double().mean(0)
    _, s, vt = torch.linalg.svd(xc, full_matrices=False)
    var = s[:k] ** 2 / x.shape[0]
    if float(var[-1]) <= 1e-8 * float(var[0]):
        raise ValueError(
            f"pca={k}: the data has only {int((var > 1e-8 * var[0]).sum())} directions of nonzero "
            "variance; lower pca")
    result: Tensor = ((xc @ vt[:k].T) / var.sqrt()).to(x.dtype)
    return result


def load_data(cfg: LayerBalanceConfig) -> tuple[Tensor, Tensor, str]:
    """``(inputs, labels, description)`` in float64: MNIST from ``mnist_dir`` or scikit-learn digits."""
    from neurothermo.data import load_digits, read_mnist

    if cfg.mnist_dir:
        x, y = read_mnist(cfg.mnist_dir, limit=cfg.mnist_limit, dtype=torch.float64)
        source = f"MNIST ({x.shape[0]} training images from {cfg.mnist_dir})"
    else:
        x, y = load_digits(torch.float64)
        source = f"scikit-learn digits ({x.shape[0]} images, 8×8; mnist_dir not given)"
    if cfg.pca:
        x = whiten(x, cfg.pca)
        source += f", top {cfg.pca} principal components whitened"
    return x, y, source


def onehot_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean_i ½‖f(x_i) − onehot(y_i)‖²`` (mean over the batch, sum over the classes)."""
    onehot = nn.functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return 0.5 * (outputs - onehot).pow(2).sum(1).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": onehot_mse,
                                                      "ce": nn.functional.cross_entropy}


@dataclass(frozen=True)
class NoisyLabels:
    """``loss(f, y')`` with y' = y, except that each sample's label is replaced, with probability
    ``p`` and afresh at every call, by a class drawn uniformly from ``n_classes`` (torch's global
    RNG, which :func:`neurothermo.train` seeds). The gradient noise then stays stationary at the
    loss minimum instead of vanishing with the training error; the expected loss is the loss on the
    smoothed targets (1 − p)·onehot(y) + p/C (up to a constant for MSE). Mean over the batch,
    like the wrapped loss."""

    loss: Callable[[Tensor, Tensor], Tensor]
    p: float
    n_classes: int

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        flip = torch.rand(targets.shape, device=targets.device) < self.p
        other = torch.randint(self.n_classes, targets.shape, device=targets.device)
        return self.loss(outputs, torch.where(flip, other, targets))


# ---- one run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    label: str
    widths: list[int]
    bias: bool
    loss: str
    optimizer: str  # "sgd" or "gd"
    lr: float
    wd: float
    steps: int
    label_noise: float = 0.0
    activation: str = "relu"


def train_one(spec: RunSpec, cfg: LayerBalanceConfig, ctx: RunContext, data: tuple[Tensor, Tensor]
              ) -> tuple[History, dict[str, Any]]:
    """Train one run with a ThermoMonitor recording every step; returns its history and activity."""
    import neurothermo.monitor as nt
    from neurothermo.train import train

    model = build_model(spec.widths, spec.bias, cfg.init_scale, ctx.seed, spec.activation)
    act0, acc0 = activity(model, data[0]), accuracy(model, *data)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = LOSSES[spec.loss]
    if spec.label_noise > 0:
        loss_fn = NoisyLabels(loss_fn, spec.label_noise, spec.widths[-1])
    mon = nt.ThermoMonitor(model, loss_fn, every=1, noise_every=None)
    log_every = max(1, spec.steps // 50)
    with ctx.progress(spec.label, spec.steps) as advance:
        def log(step: int, _model: nn.Module, loss: Tensor) -> None:
            advance(1)
            if step % log_every == 0:
                ctx.log(step, run=spec.label, loss=float(loss))

        h = train(model, loss_fn, data, optimizer=spec.optimizer, lr=spec.lr,
                     batch_size=None if spec.optimizer == "gd" else cfg.batch_size, steps=spec.steps,
                     weight_decay=spec.wd, seed=ctx.seed, monitor=mon, callbacks=[log])
    return h, {"activity_start": act0, "activity_end": activity(model, data[0]),
               "accuracy_start": acc0, "accuracy_end": accuracy(model, *data)}


def summarise(h: History, spec: RunSpec, cfg: LayerBalanceConfig) -> dict[str, Any]:
    """Layer balance, neuron balance and both sides of the drift identity over the last window."""
    import neurothermo.monitor as nt
    from neurothermo.monitor.drift import charge_drift, relaxation_count

    try:
        nbs = nt.neuron_balance(h, window=cfg.window, n_blocks=cfg.n_blocks)
    except ValueError as e:  # a layer whose every unit is dead: no per-unit fit (kept as a note)
        if "zero incoming gradient energy" not in str(e):
            raise
        nbs = ()
    return {"lb": nt.layer_balance(h, window=cfg.window, n_blocks=cfg.n_blocks), "nb": nbs,
            "drift": charge_drift(h, window=cfg.window, n_blocks=cfg.n_blocks, weight_decay=spec.wd),
            "relax": relaxation_count(h, window=cfg.window)}


def record_of(s: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    lb = s["lb"]
    return {
        **extra,
        "pairs": list(lb.pairs), "pair_ratio": lb.pair_ratio.tolist(), "pair_ratio_se": lb.pair_ratio_se.tolist(),
        "pair_in": lb.pair_in.tolist(), "pair_out": lb.pair_out.tolist(),
        "mean_imbalance": [d.pair_imbalance for d in s["drift"]],
        "drift_over_eta2T": [d.pair_drift for d in s["drift"]],
        "wd_term": [d.pair_decay for d in s["drift"]],
        "drift_se": [d.pair_drift_se for d in s["drift"]],
        "identity_error": [d.error for d in s["drift"]], "roundoff_bound": [d.roundoff for d in s["drift"]],
        "charge": [float(d.charge.sum()) for d in s["drift"]],
        "neuron_slope": [n.slope for n in s["nb"]], "neuron_slope_se": [n.slope_se for n in s["nb"]],
        "relaxation_times": list(s["relax"]),
    }


# ---- the experiment -----------------------------------------------------------------------------

def balance_specs(cfg: LayerBalanceConfig, deep: list[int]) -> list[RunSpec]:
    """The deep balance runs (one per loss, ``balance_activation``) and, on the first loss's run,
    its controls: full-batch GD on clean labels (no gradient noise at all) and η × ``small_lr``."""
    act, p, n = cfg.balance_activation, cfg.balance_label_noise, cfg.balance_steps
    lrs = {"mse": cfg.balance_lr, "ce": cfg.balance_ce_lr}
    specs = [RunSpec(f"balance {loss.upper()}", deep, cfg.bias, loss, "sgd", lrs[loss], 0.0, n, p, act)
             for loss in cfg.balance_losses]
    first = cfg.balance_losses[0]
    return [*specs,
            RunSpec("balance GD control", deep, cfg.bias, first, "gd", lrs[first], 0.0, n, 0.0, act),
            RunSpec("balance small-η control", deep, cfg.bias, first, "sgd", lrs[first] * cfg.small_lr,
                    0.0, n, p, act)]


def run(cfg: LayerBalanceConfig, ctx: RunContext) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    try:
        _run(cfg, ctx)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: LayerBalanceConfig, ctx: RunContext) -> None:
    from neurothermo.experiments.layer_balance_checks import check_all
    from neurothermo.monitor.drift import charge_drift

    x, y, source = load_data(cfg)
    d_in = int(x.shape[1])
    deep = [d_in, *cfg.hidden, 10]
    ref = [d_in, cfg.ref_hidden, 10]
    specs = [RunSpec(f"deep {loss.upper()}", deep, cfg.bias, loss, "sgd",
                     cfg.ce_lr if loss == "ce" else cfg.lr, 0.0, cfg.steps, cfg.label_noise, cfg.activation)
             for loss in cfg.losses]
    specs += [
        RunSpec("reference", ref, False, "mse", "sgd", cfg.lr, 0.0, cfg.ref_steps),
        RunSpec("GD control", ref, False, "mse", "gd", cfg.lr, 0.0, cfg.ref_steps),
        RunSpec("small-η control", ref, False, "mse", "sgd", cfg.lr * cfg.small_lr, 0.0, cfg.ref_steps),
        RunSpec("deep + wd", deep, cfg.bias, "mse", "sgd", cfg.lr, cfg.weight_decay, cfg.wd_steps,
                activation=cfg.activation),
    ]
    specs += balance_specs(cfg, deep)
    runs = {s.label: (s, *train_one(s, cfg, ctx, (x, y))) for s in specs}
    sums = {k: summarise(h, s, cfg) for k, (s, h, _) in runs.items()}
    wd_spec, wd_h, _ = runs["deep + wd"]
    relax = max(cfg.n_blocks * 2, math.ceil(1 / (cfg.lr * cfg.weight_decay * (2 - cfg.lr * cfg.weight_decay))))
    early = charge_drift(wd_h, window=(0, min(relax, wd_spec.steps - 1)), n_blocks=cfg.n_blocks,
                         weight_decay=wd_spec.wd)
    check_all(ctx, cfg, runs, sums, early)
    ctx.record(data=source, input_dim=d_in, n_samples=int(x.shape[0]), deep_widths=deep, ref_widths=ref,
               runs={k: record_of(sums[k], {"loss": s.loss, "lr": s.lr, "wd": s.wd, "steps": s.steps,
                                            "label_noise": s.label_noise, "activation": s.activation,
                                            **act}) for k, (s, _, act) in runs.items()},
               wd_early_window=[0, min(relax, wd_spec.steps - 1)])
    from neurothermo.experiments.layer_balance_figure import figure

    figure(cfg, ctx, runs, sums, source)


EXPERIMENT = register(
    Experiment(
        name="layer-balance",
        title="Gradient balance at every depth: the charge-drift identity, balance where J is "
              "stationary, the weight-decay law per neuron (Fig. 2)",
        config=LayerBalanceConfig,
        quick=LayerBalanceConfig(),
        full=LayerBalanceConfig(steps=20_000, ref_steps=20_000, wd_steps=10_000, balance_steps=20_000,
                                n_blocks=20),
        run=run,
        cost="full: 10 runs, 190k monitored steps, ~3.3 min (197 s CPU) on one core "
             "(docs/experiments/layer-balance.md)",
    )
)
