"""Human-readable views of run folders (used by ``neurothermo show`` and ``reproduce``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from neurothermo.runstore import read_status, read_summary


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        if len(v) > 6:
            return f"[{len(v)} values]"
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return f"{{{len(v)} entries}}"
    return str(v)


def summary_tables(run_dir: Path) -> list[Table]:
    """Tables for one run: the checked predictions, then the recorded figures."""
    s = read_summary(run_dir)
    head = (f"{s.get('experiment')} — {s.get('status', read_status(run_dir))} "
            f"({s.get('preset')}, seed {s.get('seed')}, {s.get('seconds', 0):.1f} s)")
    preds = Table(title=head, title_justify="left")
    for col in ("prediction", "measured", "predicted", "tolerance", "passed"):
        preds.add_column(col, overflow="fold")
    for p in s.get("predictions", []):
        sign = {"at_most": "≤ ", "at_least": "≥ "}.get(p.get("sense", "equal"), "")
        tol = _fmt(p["tolerance"]) + (" (rel)" if p.get("relative") else "")
        mark = "[green]yes[/]" if p["passed"] else "[red]NO[/]"
        preds.add_row(p["name"], _fmt(p["measured"]), sign + _fmt(p["predicted"]), tol, mark)
    figs = Table(title="figures", title_justify="left")
    figs.add_column("name")
    figs.add_column("value", overflow="fold")
    for k, v in s.get("figures", {}).items():
        figs.add_row(k, _fmt(v))
    if s.get("reason"):
        figs.add_row("[red]failure[/]", s["reason"])
    return [preds, figs]


def print_summary(run_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    for t in summary_tables(run_dir):
        console.print(t)
