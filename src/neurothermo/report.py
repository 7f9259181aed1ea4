"""Human-readable views of run folders (used by ``neurothermo show`` and ``reproduce``).

Everything read from a run folder is untrusted text: it is shown through :func:`untrusted`, which
escapes rich markup and replaces control characters (terminal escape sequences) by visible
``\\xNN`` escapes, so a summary cannot restyle, clear or retitle the user's terminal.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from neurothermo.runstore import read_status, read_summary


def untrusted(text: Any) -> str:
    """``text`` made safe to print with rich: control characters (C0, C1, DEL: ESC sequences,
    bells, carriage returns) become ``\\xNN``/``\\uNNNN`` escapes, and rich markup is escaped."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) == "Cc" and ch not in "\n\t":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return escape("".join(out))


def _fmt(v: Any) -> str:
    return untrusted(_plain(v))


def _plain(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        if len(v) > 6:
            return f"[{len(v)} values]"
        return "[" + ", ".join(_plain(x) for x in v) + "]"
    if isinstance(v, dict):
        return f"{{{len(v)} entries}}"
    return str(v)


def summary_tables(run_dir: Path) -> list[Table]:
    """Tables for one run: the checked predictions, then the recorded figures."""
    s = read_summary(run_dir)
    seconds = s.get("seconds", 0)
    seconds = f"{seconds:.1f} s" if isinstance(seconds, int | float) else "? s"
    head = untrusted(f"{s.get('experiment')} — {s.get('status', read_status(run_dir))} "
                     f"({s.get('preset')}, seed {s.get('seed')}, {seconds})")
    preds = Table(title=head, title_justify="left")
    for col in ("prediction", "measured", "predicted", "tolerance", "passed"):
        preds.add_column(col, overflow="fold")
    for p in s.get("predictions", []):
        sign = {"at_most": "≤ ", "at_least": "≥ "}.get(p.get("sense", "equal"), "")
        tol = _fmt(p["tolerance"]) + (" (rel)" if p.get("relative") else "")
        mark = "[green]yes[/]" if p["passed"] else "[red]NO[/]"
        preds.add_row(_fmt(p["name"]), _fmt(p["measured"]), sign + _fmt(p["predicted"]), tol, mark)
    figs = Table(title="figures", title_justify="left")
    figs.add_column("name")
    figs.add_column("value", overflow="fold")
    for k, v in s.get("figures", {}).items():
        figs.add_row(_fmt(k), _fmt(v))
    if s.get("reason"):
        figs.add_row("[red]failure[/]", _fmt(s["reason"]))
    return [preds, figs]


def print_summary(run_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    for t in summary_tables(run_dir):
        console.print(t)
