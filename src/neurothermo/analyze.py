"""``neurothermo analyze SPEC.py``: the toolkit pointed at the user's own model, without code.

A spec is a Python file that defines

* ``model()`` → a fresh ``nn.Module``;
* ``loss_fn`` → a mean-reduced ``loss_fn(outputs, targets)``, or ``None`` when the model returns
  its own loss (Hugging Face style, ``outputs.loss``);
* ``data()`` → the data in neurothermo's data model (``docs/data.md``): a pair ``(inputs,
  targets)`` with inputs a tensor or a dict of tensors, or an iterable of such batches (a
  ``DataLoader``).

**Loading a spec executes it**, as ``python SPEC.py`` would: analyse only specs you trust. A
checkpoint a spec loads should be read with :func:`load_weights` (``torch.load(...,
weights_only=True)``), which cannot run code.

The analysis (a run folder under ``--out``, plus ``analysis.html``): the symmetries found, each with
its verified output change, and the patterns rejected with why; the entropic decomposition at the
given learning rate and batch size (loss, discretization ``(lr/4)‖∇L‖²``, noise ``(lr/4)Tr Σ_B``,
temperature ``lr/b``); the top Hessian eigenvalues of the loss on up to ``eigen_samples`` samples
and ``lr·λ_max`` against the stability limit 2; with ``steps > 0`` a short SGD run under a
:class:`~neurothermo.ThermoMonitor` (loss, layer balance, charges); with ``compare`` a layer × layer
alignment map between the two specs' models on the same inputs.
"""
from __future__ import annotations

import html
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurothermo.config import setting
from neurothermo.experiments.base import Experiment, RunContext

TEMPLATE = '''"""A neurothermo analysis spec: run it with `neurothermo analyze THIS_FILE.py`.

Loading a spec executes it. Define model(), loss_fn and data(); everything else is up to you.
"""
import torch
from torch import nn


def model() -> nn.Module:
    """A fresh model (load trained weights with neurothermo.analyze.load_weights(path))."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


# Mean-reduced over the batch (l_B = (1/b) sum_i l_i). None: the model returns its own loss.
loss_fn = nn.CrossEntropyLoss()


def data():
    """(inputs, targets) tensors, a dict-input batch, or a DataLoader of such batches."""
    from neurothermo.data import load_digits

    x, y = load_digits()  # 1,797 real 8x8 digits, offline
    return x[:512], y[:512]
'''


class SpecError(ValueError):
    """A spec file is missing, broken, or does not define what ``analyze`` needs."""


@dataclass(frozen=True)
class Spec:
    """A loaded spec: a fresh model, the loss (None: the model's own) and the data."""

    path: Path
    model: nn.Module
    loss_fn: Any
    data: Any


_FORM = ("a spec defines model() -> nn.Module, loss_fn (a mean-reduced loss(outputs, targets), "
         "or None when the model returns its loss) and data() -> (inputs, targets) or a DataLoader; "
         "`neurothermo analyze --template` prints one that runs as is")


def load_weights(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a ``state_dict`` saved with ``torch.save`` into ``model`` with ``weights_only=True``
    (a checkpoint cannot execute code); returns ``model``."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model.load_state_dict(state)
    return model


def load_spec(path: str | Path) -> Spec:
    """Execute the spec file and check what it defines (see the module docstring).

    Raises:
        SpecError: the file is missing or raises, a name is missing, ``model()`` does not return a
            module, ``data()`` is not in the data model, or the loss of a few samples cannot be
            computed (shapes that do not fit the model).
    """
    from neurothermo._data import as_data, model_loss

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec {str(path)!r} is not a file; {_FORM}")
    try:
        ns = runpy.run_path(str(path), run_name="neurothermo_spec")
    except SyntaxError as exc:
        raise SpecError(f"spec {path} has a syntax error at line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:
        raise SpecError(f"spec {path} raised while loading: {type(exc).__name__}: {exc}") from exc
    missing = [n for n in ("model", "loss_fn", "data") if n not in ns]
    if missing:
        raise SpecError(f"spec {path} does not define {', '.join(missing)}; {_FORM}")
    if not callable(ns["model"]) or not callable(ns["data"]):
        raise SpecError(f"spec {path}: model and data must be functions; {_FORM}")
    try:
        model = ns["model"]()
    except Exception as exc:
        raise SpecError(f"spec {path}: model() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise SpecError(f"spec {path}: model() returned {type(model).__name__}, not an "
                        f"nn.Module; {_FORM}")
    loss_fn = ns["loss_fn"]
    if loss_fn is not None and not callable(loss_fn):
        raise SpecError(f"spec {path}: loss_fn is a {type(loss_fn).__name__}, not callable; {_FORM}")
    loss_fn = model_loss if loss_fn is None else loss_fn
    try:
        data = ns["data"]()
    except Exception as exc:
        raise SpecError(f"spec {path}: data() raised {type(exc).__name__}: {exc}") from exc
    try:
        batches = as_data(data, loss_fn, name="data()").batches()
        with torch.no_grad():
            loss = batches[0][: min(4, batches[0].size)].loss(model, loss_fn)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise SpecError(f"spec {path}: the loss of the first samples of data() cannot be "
                        f"computed with model() and loss_fn: {exc}") from exc
    if loss.ndim != 0:
        raise SpecError(f"spec {path}: the loss has shape {tuple(loss.shape)}; it must be the mean "
                        "over the batch (a scalar)")
    return Spec(path, model, loss_fn, batches)


@dataclass(frozen=True)
class AnalyzeConfig:
    spec: str = setting("", "the spec file (model(), loss_fn, data())")
    lr: float = setting(0.1, "learning rate η of the SGD the analysis describes", min=1e-12)
    batch_size: int = setting(32, "SGD batch size b", min=2)
    weight_decay: float = setting(0.0, "torch's wd (penalty (wd/2)‖θ‖², the paper's γ = wd/2)",
                                  min=0.0)
    steps: int = setting(0, "SGD steps of a short monitored run (0: none)", min=0, max=10**7)
    k: int = setting(3, "number of top Hessian eigenvalues", min=1, max=50)
    eigen_samples: int = setting(512, "samples of the fixed subset for the eigenvalues", min=2)
    compare: str = setting("", "a second spec: layer × layer alignment on the same inputs")


def _first(spec: Spec, n: int) -> Any:
    from neurothermo._data import concat

    batch = concat(spec.data)
    return batch[: min(n, batch.size)]


def _symmetries(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    from neurothermo.symmetry import find_symmetries

    example = _first(spec, 8)
    args = example.args
    try:
        with torch.no_grad():
            report = find_symmetries(spec.model, args if len(args) > 1 else args[0], explain=True)
    except Exception as exc:  # an untraceable model is reported, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return {"found": [{"kind": s.kind, "location": s.location, "change": c}
                      for s, c in zip(report.symmetries, report.changes)],
            "rejected": [{"location": r.location, "reason": r.reason} for r in report.rejected],
            "text": str(report)}


def run(cfg: AnalyzeConfig, ctx: RunContext) -> None:
    from neurothermo import alignment
    from neurothermo.curvature import top_eigenvalues
    from neurothermo.entropic import entropic_decomposition
    from neurothermo.experiments._common import pyplot
    from neurothermo.monitor import ThermoMonitor, layer_balance
    from neurothermo.train import train

    spec = load_spec(cfg.spec)
    n = sum(b.size for b in spec.data)
    ctx.record(spec=str(spec.path), samples=n,
               parameters=sum(p.numel() for p in spec.model.parameters() if p.requires_grad))
    sym = _symmetries(spec, ctx)
    ctx.record(symmetries=sym)
    dec = entropic_decomposition(spec.model, spec.loss_fn, spec.data, lr=cfg.lr,
                                    batch_size=min(cfg.batch_size, n),
                                    weight_decay=cfg.weight_decay)
    ctx.record(entropic={"loss": dec.loss, "discretization": dec.discretization,
                         "noise": dec.noise, "trace_sigma": dec.trace_sigma,
                         "temperature": cfg.lr / min(cfg.batch_size, n)})
    subset = _first(spec, cfg.eigen_samples)
    eig = top_eigenvalues(spec.model, spec.loss_fn, subset.as_given(), k=min(cfg.k, 50))
    lam = [float(v) for v in eig.values]
    ctx.record(eigenvalues=lam, lr_times_lambda_max=cfg.lr * lam[0], stable=cfg.lr * lam[0] < 2)
    if cfg.compare:
        other = load_spec(cfg.compare)
        inputs = _first(spec, 256).as_given()
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        fa = alignment.capture_features(spec.model.eval(), inputs)
        fb = alignment.capture_features(other.model.eval(), inputs)
        m = alignment.alignment_matrix(fa, fb, "cka")
        ctx.record(alignment={"metric": "cka", "rows": list(m.rows), "cols": list(m.cols),
                              "matrix": m.matrix.tolist()})
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow(m.matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(m.rows)), m.rows, fontsize=6)
        ax.set_xticks(range(len(m.cols)), m.cols, fontsize=6, rotation=90)
        ax.set_ylabel(spec.path.name)
        ax.set_xlabel(other.path.name)
        fig.colorbar(im, label="linear CKA")
        ctx.savefig(fig, "alignment")
    if cfg.steps:
        spec.model.train()
        mon = ThermoMonitor(spec.model, spec.loss_fn, noise_every=max(1, cfg.steps // 20))
        hist = train(spec.model, spec.loss_fn, spec.data, lr=cfg.lr,
                        batch_size=min(cfg.batch_size, n), steps=cfg.steps,
                        weight_decay=cfg.weight_decay, monitor=mon, seed=ctx.seed)
        lb = layer_balance(hist)
        ctx.record(balance={"layers": list(lb.layers) if hasattr(lb, "layers") else [],
                            "pair_ratio": [float(r) for r in lb.pair_ratio]})
        loss = torch.as_tensor(hist["loss"]).double()
        for i in range(0, len(loss), max(1, len(loss) // 200)):
            ctx.log(i, loss=float(loss[i]))
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(hist.steps("loss"), loss.numpy())
        ax.set_xlabel("step")
        ax.set_ylabel("minibatch loss")
        ax.set_yscale("log")
        ctx.savefig(fig, "training")
    ctx.run.write_text("analysis.html", page(ctx.figures, ctx.out_dir, cfg))


def page(figures: dict[str, Any], folder: Path, cfg: AnalyzeConfig) -> str:
    """``analysis.html``: a self-contained page of one analysis (escaped, figures embedded)."""
    from neurothermo.htmlreport import _CSS, _figures, _kv_table

    e = html.escape
    sym = figures.get("symmetries", {})
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>analysis of "
             f"{e(str(figures.get('spec')))}</title><style>{_CSS}</style></head><body>",
             f"<h1>neurothermo analyze</h1><p>spec <code>{e(str(figures.get('spec')))}</code>: "
             f"{figures.get('parameters')} trainable parameters, {figures.get('samples')} samples; "
             f"lr {cfg.lr:g}, batch size {cfg.batch_size}, weight decay {cfg.weight_decay:g}.</p>",
             "<h2>Symmetries</h2>"]
    if "error" in sym:
        parts.append(f"<p class=bad>symmetry search failed: {e(sym['error'])}</p>")
    else:
        rows = "".join(f"<tr><td>{e(s['kind'])}</td><td>{e(s['location'])}</td>"
                       f"<td>{s['change']:.1e}</td></tr>" for s in sym.get("found", []))
        parts.append("<table><tr><th>kind</th><th>where</th><th>verified output change</th></tr>"
                     f"{rows}</table>")
        rej = "".join(f"<tr><td>{e(r['location'])}</td><td>{e(r['reason'])}</td></tr>"
                      for r in sym.get("rejected", []))
        parts.append("<details><summary>Patterns not reported, and why</summary><table>"
                     f"<tr><th>where</th><th>why</th></tr>{rej}</table></details>")
    parts.append("<h2>Entropic decomposition</h2><p>E_B φ = L + (lr/4)‖∇L‖² + (lr/4)·Tr Σ_B</p>")
    parts.append(_kv_table(figures.get("entropic", {})))
    lam = figures.get("eigenvalues", [])
    parts.append(f"<h2>Sharpness</h2><p>top eigenvalues {e(', '.join(f'{v:.4g}' for v in lam))}; "
                 f"lr·λ_max = {figures.get('lr_times_lambda_max', float('nan')):.3g} "
                 f"({'below' if figures.get('stable') else 'at or above'} the stability limit 2)</p>")
    if "balance" in figures:
        parts.append("<h2>Short training run</h2>" + _kv_table(figures["balance"]))
    for name, uri in _figures(folder, ["training.png", "alignment.png"]):
        if uri:
            parts.append(f'<figure><img src="{uri}" alt="{e(name)}"></figure>')
    parts.append("</body></html>\n")
    return "".join(parts)


EXPERIMENT = Experiment(
    name="analyze", title="symmetries, entropic terms, sharpness and balance of a user's model",
    config=AnalyzeConfig, quick=AnalyzeConfig(), full=AnalyzeConfig(), run=run,
    cost="seconds to minutes, depending on the model and --steps")
