"""``report.html``: one self-contained page over a run store (``neurothermo report RUNS_DIR``).

The page opens from disk without a server: figures are embedded as ``data:`` URIs, the style is
inline, there is no script. First an overview — per experiment its status, the theory predictions
that held out of those checked, the controls that behaved as the theory says (the effect absent
where its cause is switched off) and the run time — then one section per experiment: what the
theory predicts, each prediction measured against predicted with its tolerance and where that
tolerance comes from, the controls, the figures, the configuration and the environment.

Everything read from a run folder is untrusted text and goes through :func:`html.escape`; a folder
that cannot be read is listed with the reason instead of stopping the report. Per experiment the
newest run folder (by its ``<timestamp>-<id>`` name) is shown, whatever its status.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurothermo.runstore import RunReadError, atomic_write_text, read_status, read_summary

MAX_FIGURE_BYTES = 8 * 1024 * 1024  # a larger PNG is linked by name instead of embedded


@dataclass(frozen=True)
class RunView:
    """What the report shows of one run folder (``error`` set when it could not be read)."""

    experiment: str
    path: Path
    status: str
    summary: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    preset: str = ""
    env: dict[str, Any] = field(default_factory=dict)
    figures: tuple[tuple[str, str], ...] = ()  # (file name, data URI or "")
    error: str | None = None

    @property
    def predictions(self) -> list[dict[str, Any]]:
        return [p for p in (self.summary or {}).get("predictions", []) if not p.get("control")]

    @property
    def controls(self) -> list[dict[str, Any]]:
        return [p for p in (self.summary or {}).get("predictions", []) if p.get("control")]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _figures(run_dir: Path, names: list[Any]) -> tuple[tuple[str, str], ...]:
    out = []
    for name in names:
        if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".png"):
            continue  # only PNG files inside the run folder itself
        f = run_dir / name
        try:
            raw = f.read_bytes() if f.is_file() and f.stat().st_size <= MAX_FIGURE_BYTES else b""
        except OSError:
            raw = b""
        uri = "data:image/png;base64," + base64.b64encode(raw).decode() if raw else ""
        out.append((name, uri))
    return tuple(out)


def read_run(run_dir: Path) -> RunView:
    """A :class:`RunView` of one run folder; never raises for a damaged folder."""
    run_dir = Path(run_dir)
    experiment = run_dir.parent.name
    status = read_status(run_dir)
    try:
        summary = read_summary(run_dir)
    except (FileNotFoundError, RunReadError) as exc:
        return RunView(experiment, run_dir, status, error=str(exc))
    config = _read_json(run_dir / "config.json")
    settings = config.get("settings", {})
    return RunView(
        experiment=str(summary.get("experiment", experiment)), path=run_dir, status=status,
        summary=summary, settings=settings if isinstance(settings, dict) else {},
        preset=str(config.get("preset", summary.get("preset", ""))),
        env=_read_json(run_dir / "env.json"),
        figures=_figures(run_dir, summary.get("files", []) if isinstance(summary.get("files"), list)
                         else []))


def collect_runs(root: Path) -> list[RunView]:
    """The newest run folder of every experiment under ``root`` (``root/<experiment>/<run>/``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a folder; give the run store (e.g. runs/)")
    views = []
    for exp_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        runs = sorted(p for p in exp_dir.iterdir() if p.is_dir() and (p / "status").exists())
        if runs:
            views.append(read_run(runs[-1]))
    return views


# ---- rendering --------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_num(x) for x in v[:8]) + (", …" if len(v) > 8 else "") + "]"
    return str(v)


_SENSE = {"at_most": "≤ ", "at_least": "≥ "}


def _prediction_rows(preds: list[dict[str, Any]], held_word: str) -> str:
    rows = []
    for p in preds:
        tol = _num(p.get("tolerance")) + (" (relative)" if p.get("relative") else "")
        ok = bool(p.get("passed"))
        mark = f'<td class="{"ok" if ok else "bad"}">{"yes" if ok else "NO"}</td>'
        rows.append(
            f"<tr><td>{_e(p.get('name'))}</td><td>{_e(_num(p.get('measured')))}</td>"
            f"<td>{_e(_SENSE.get(str(p.get('sense')), ''))}{_e(_num(p.get('predicted')))}</td>"
            f"<td>{_e(tol)}</td>{mark}<td class=why>{_e(p.get('why', ''))}</td></tr>")
    head = ("<tr><th>check</th><th>measured</th><th>predicted</th><th>tolerance</th>"
            f"<th>{_e(held_word)}</th><th>where the tolerance comes from</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_num(v) if not isinstance(v, dict) else json.dumps(v))}</td></tr>"
                   for k, v in d.items())
    return f"<table class=kv>{rows}</table>"


def _count(preds: list[dict[str, Any]]) -> str:
    return f"{sum(bool(p.get('passed')) for p in preds)} / {len(preds)}" if preds else "—"


def _section(v: RunView, description: str) -> str:
    parts = [f'<section id="{_e(v.experiment)}"><h2>{_e(v.experiment)}</h2>']
    title = (v.summary or {}).get("title", "")
    if title:
        parts.append(f"<p class=title>{_e(title)}</p>")
    if description:
        parts.append(f"<details open><summary>What the theory predicts</summary>"
                     f"<pre>{_e(description)}</pre></details>")
    parts.append(f"<p>status <b class=st-{_e(v.status)}>{_e(v.status)}</b> · run folder "
                 f"<code>{_e(v.path)}</code></p>")
    if v.error:
        parts.append(f'<p class=bad>This run cannot be read: {_e(v.error)}</p></section>')
        return "".join(parts)
    reason = (v.summary or {}).get("reason")
    if reason:
        parts.append(f"<p class=bad>failure: {_e(reason)}</p>")
    parts.append("<h3>Predictions</h3>")
    parts.append(_prediction_rows(v.predictions, "held") if v.predictions else "<p>none checked</p>")
    if v.controls:
        parts.append("<h3>Controls (the effect must be absent)</h3>")
        parts.append(_prediction_rows(v.controls, "as predicted"))
    for name, uri in v.figures:
        if uri:
            parts.append(f'<figure><img src="{uri}" alt="{_e(name)}"><figcaption>{_e(name)}'
                         "</figcaption></figure>")
        else:
            parts.append(f"<p>figure {_e(name)} is missing or too large to embed</p>")
    figures = (v.summary or {}).get("figures", {})
    if figures:
        parts.append("<details><summary>Recorded numbers</summary>"
                     f"{_kv_table(figures)}</details>")
    parts.append(f"<details><summary>Configuration ({_e(v.preset)} preset)</summary>"
                 f"{_kv_table(v.settings)}</details>")
    parts.append(f"<details><summary>Environment</summary>{_kv_table(v.env)}</details></section>")
    return "".join(parts)


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;
vertical-align:top;text-align:left}th{background:#f3f3f3}.ok{color:#075}.bad{color:#b00;font-weight:600}
.why{color:#555;max-width:420px}img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}
pre{white-space:pre-wrap;background:#fafafa;padding:.6em;border:1px solid #eee;font-size:12.5px}
section{border-top:2px solid #ddd;margin-top:2em}.st-done{color:#075}.st-failed,.st-interrupted{color:#b00}
"""


def render(views: list[RunView], *, title: str = "neurothermo report",
           descriptions: dict[str, str] | None = None) -> str:
    """The HTML text of the report over ``views`` (see the module docstring)."""
    descriptions = descriptions or {}
    rows = []
    for v in views:
        secs = (v.summary or {}).get("seconds")
        secs_txt = f"{secs:.1f} s" if isinstance(secs, int | float) and not isinstance(secs, bool) else "—"
        rows.append(f'<tr><td><a href="#{_e(v.experiment)}">{_e(v.experiment)}</a></td>'
                    f"<td class=st-{_e(v.status)}>{_e(v.status)}"
                    f"{' (unreadable)' if v.error else ''}</td>"
                    f"<td>{_e(_count(v.predictions))}</td><td>{_e(_count(v.controls))}</td>"
                    f"<td>{_e(secs_txt)}</td></tr>")
    made = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    overview = ("<table><tr><th>experiment</th><th>status</th><th>predictions held</th>"
                "<th>controls as predicted</th><th>time</th></tr>" + "".join(rows) + "</table>")
    sections = "".join(_section(v, descriptions.get(v.experiment, "")) for v in views)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p>Made {_e(made)} from {len(views)} experiment(s). A prediction holds when the "
            "measurement is within its derived tolerance; a control behaves as predicted when the "
            "effect is absent where the theory says its cause is switched off.</p>"
            f"<h2>Overview</h2>{overview}{sections}</body></html>\n")


def experiment_descriptions() -> dict[str, str]:
    """The module docstring of every registered experiment (what its theory predicts)."""
    import sys

    from neurothermo.experiments.base import all_experiments

    out = {}
    for exp in all_experiments():
        mod = sys.modules.get(getattr(exp.run, "__module__", ""))
        doc = (mod.__doc__ or "").strip() if mod is not None else ""
        out[exp.name] = doc
    return out


def write_report(root: Path | str, out: Path | str | None = None, *,
                 title: str = "neurothermo report") -> Path:
    """Write ``report.html`` for the run store ``root`` (default ``root/report.html``) atomically.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    views = collect_runs(root)
    target = Path(out) if out is not None else root / "report.html"
    atomic_write_text(target, render(views, title=title, descriptions=experiment_descriptions()))
    return target
