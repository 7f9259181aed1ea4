"""Aggregate a sweep's cells over seeds: mean ± standard error, fraction passing, table and heat maps.

For every grid point the finished cells (one per seed) are read and reduced: every numeric entry
of ``figures`` (one level of nested dicts flattened as ``name.key``) and every prediction's
``measured`` give ``mean`` and ``se = s / √n`` with ``s`` the sample standard deviation over the
``n`` seeds that have the entry (``se`` is empty when ``n = 1``); every prediction also gives the
fraction of seeds where it held. Heat maps are drawn for 1-D and 2-D grids on the true
coordinates, each cell spanning from the midpoint to its neighbours (geometric midpoints on a
log axis when the values are evenly spaced in log).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_HEATMAPS = 40  # one PNG per quantity; more than this is left to table.csv


def _numbers(figures: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in figures.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, int | float) and not isinstance(v2, bool):
                    out[f"{k}.{k2}"] = float(v2)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def mean_se(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error ``s/√n`` (sample s, ddof = 1) of the finite values; None if none
    (se None when fewer than two)."""
    vals = [x for x in xs if math.isfinite(x)]
    if not vals:
        return None, None
    n = len(vals)
    m = math.fsum(vals) / n
    if n < 2:
        return m, None
    var = math.fsum((x - m) ** 2 for x in vals) / (n - 1)
    return m, math.sqrt(var / n)


def aggregate(points: list[dict[str, Any]], summaries: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per grid point: the point, seeds done, and per quantity mean/se (and pass fraction).

    Args:
        points: the grid points (``key -> value``), in grid order.
        summaries: for each point, the ``summary.json`` of its finished cells.
    """
    rows = []
    for point, sums in zip(points, summaries, strict=True):
        row: dict[str, Any] = {"point": point, "seeds_done": len(sums), "figures": {},
                               "predictions": {}}
        names: dict[str, list[float]] = {}
        for s in sums:
            for k, v in _numbers(s.get("figures", {})).items():
                names.setdefault(k, []).append(v)
        for k, vs in names.items():
            m, se = mean_se(vs)
            row["figures"][k] = {"mean": m, "se": se, "n": len(vs)}
        preds: dict[str, list[dict[str, Any]]] = {}
        for s in sums:
            for p in s.get("predictions", []):
                preds.setdefault(p["name"], []).append(p)
        for k, ps in preds.items():
            m, se = mean_se([float(p["measured"]) for p in ps])
            row["predictions"][k] = {"mean": m, "se": se, "n": len(ps),
                                     "passed": sum(bool(p["passed"]) for p in ps),
                                     "fraction_passed": sum(bool(p["passed"]) for p in ps) / len(ps),
                                     "control": bool(ps[0].get("control", False))}
        rows.append(row)
    return rows


def _fmt(x: Any) -> str:
    return "" if x is None else repr(x) if isinstance(x, float) else str(x)


def write_csv(path: Path, keys: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """``table.csv``: grid keys, seeds done, then ``<quantity> mean``/``se`` (and ``passed
    fraction`` for predictions), one row per grid point."""
    from neurothermo.runstore import atomic_write_text

    figs = sorted({k for r in rows for k in r["figures"]})
    preds = list(dict.fromkeys(k for r in rows for k in r["predictions"]))
    header = [*keys, "seeds_done"]
    for k in figs:
        header += [f"{k} mean", f"{k} se"]
    for k in preds:
        header += [f"{k}: measured mean", f"{k}: measured se", f"{k}: passed fraction"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        line = [_fmt(r["point"][k]) for k in keys] + [str(r["seeds_done"])]
        for k in figs:
            e = r["figures"].get(k, {})
            line += [_fmt(e.get("mean")), _fmt(e.get("se"))]
        for k in preds:
            e = r["predictions"].get(k, {})
            line += [_fmt(e.get("mean")), _fmt(e.get("se")), _fmt(e.get("fraction_passed"))]
        w.writerow(line)
    atomic_write_text(path, buf.getvalue())


def cell_edges(values: Sequence[Any]) -> tuple[list[float], bool, list[str] | None]:
    """Edges of the cells of sorted axis ``values``: midpoints between neighbours, the outer ones
    mirrored. Returns ``(edges, log, labels)``: ``log`` when the values are positive and evenly
    spaced in log rather than linearly (midpoints are then geometric); non-numeric values get
    unit cells at 0, 1, … and ``labels``."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [i - 0.5 for i in range(len(values) + 1)], False, [str(v) for v in values]
    xs = [float(v) for v in values]
    if len(xs) == 1:
        half = abs(xs[0]) * 0.5 or 0.5
        return [xs[0] - half, xs[0] + half], False, None
    lin = [b - a for a, b in itertools.pairwise(xs)]
    log = all(x > 0 for x in xs) and len(xs) > 2
    if log:
        ratios = [math.log(b / a) for a, b in itertools.pairwise(xs)]

        def spread(d: list[float]) -> float:
            return (max(d) - min(d)) / (abs(sum(d) / len(d)) or 1.0)

        log = spread(ratios) < spread(lin)
    t = [math.log(x) for x in xs] if log else xs
    mids = [(a + b) / 2 for a, b in itertools.pairwise(t)]
    edges = [t[0] - (mids[0] - t[0]), *mids, t[-1] + (t[-1] - mids[-1])]
    return ([math.exp(e) for e in edges] if log else edges), log, None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "quantity"


def heatmaps(folder: Path, axes: Sequence[tuple[str, Sequence[Any]]], rows: list[dict[str, Any]],
             title: str) -> list[str]:
    """Draw one heat map per quantity (predictions first) for a 1-D or 2-D grid; returns the files.

    Prediction maps write the fraction of seeds passing in each cell."""
    if len(axes) not in (1, 2):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from neurothermo.runstore import atomic_write_bytes

    keys = [k for k, _ in axes]
    sorted_vals = [sorted(v) if all(isinstance(x, int | float) for x in v) else list(v)
                   for _, v in axes]
    index = {tuple(r["point"][k] for k in keys): r for r in rows}
    quantities = [("predictions", k) for k in dict.fromkeys(k for r in rows for k in r["predictions"])]
    quantities += [("figures", k) for k in sorted({k for r in rows for k in r["figures"]})]
    files: list[str] = []
    for kind, name in quantities[:MAX_HEATMAPS]:
        xv = sorted_vals[0]
        yv = sorted_vals[1] if len(axes) == 2 else [None]
        z = np.full((len(yv), len(xv)), np.nan)
        text: dict[tuple[int, int], str] = {}
        for j, y in enumerate(yv):
            for i, x in enumerate(xv):
                r = index.get((x,) if len(axes) == 1 else (x, y))
                e = r[kind].get(name) if r else None
                if e and e["mean"] is not None:
                    z[j, i] = e["mean"]
                    if kind == "predictions":
                        text[(j, i)] = f"{e['passed']}/{e['n']}"
        xe, xlog, xlab = cell_edges(xv)
        ye, ylog, ylab = cell_edges(yv) if len(axes) == 2 else ([0.0, 1.0], False, None)
        fig, ax = plt.subplots(figsize=(6.4, 4.2 if len(axes) == 2 else 2.2))
        mesh = ax.pcolormesh(xe, ye, np.ma.masked_invalid(z), shading="flat", cmap="viridis")
        fig.colorbar(mesh, ax=ax, label=("measured (mean over seeds)" if kind == "predictions"
                                         else "mean over seeds"))
        for (j, i), s in text.items():
            cx = math.sqrt(xe[i] * xe[i + 1]) if xlog else (xe[i] + xe[i + 1]) / 2
            cy = math.sqrt(ye[j] * ye[j + 1]) if ylog else (ye[j] + ye[j + 1]) / 2
            ax.text(cx, cy, s, ha="center", va="center", fontsize=8,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
        if xlog:
            ax.set_xscale("log")
        if ylog:
            ax.set_yscale("log")
        if xlab:
            ax.set_xticks(range(len(xlab)), xlab)
        elif len(xv) <= 12:  # tick the grid values themselves
            ax.set_xticks([float(x) for x in xv], [f"{x:g}" for x in xv])
            ax.minorticks_off()
        if ylab:
            ax.set_yticks(range(len(ylab)), ylab)
        elif len(axes) == 2 and len(yv) <= 12:
            ax.set_yticks([float(y) for y in yv if y is not None], [f"{y:g}" for y in yv])
            ax.minorticks_off()
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_xlabel(keys[0])
        if len(axes) == 2:
            ax.set_ylabel(keys[1])
        else:
            ax.set_yticks([])
        ax.set_title(f"{title}\n{name}" + (" (passed/seeds)" if kind == "predictions" else ""),
                     fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        fname = f"heatmap-{'pred' if kind == 'predictions' else 'fig'}-{len(files):02d}-{_slug(name)}.png"
        atomic_write_bytes(folder / fname, buf.getvalue())
        files.append(fname)
    return files


def read_summary_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((path / "summary.json").read_text()))
    except (OSError, ValueError):
        return None


def print_table(rows: list[dict[str, Any]], keys: Sequence[str], console: Any) -> None:
    """Print the grid points with each prediction's measured mean ± se and seeds passing
    (predictions as P1, P2, … with a legend); every quantity is in ``table.csv``."""
    from rich.table import Table

    from neurothermo.report import untrusted

    preds = list(dict.fromkeys(k for r in rows for k in r["predictions"]))
    table = Table(title_justify="left")
    for k in [*keys, "seeds"]:
        table.add_column(untrusted(k))
    for j, _ in enumerate(preds):
        table.add_column(f"P{j + 1}", overflow="fold")
    for r in rows:
        cells = [untrusted(str(r["point"][k])) for k in keys] + [str(r["seeds_done"])]
        for k in preds:
            e = r["predictions"].get(k)
            if not e or e["mean"] is None:
                cells.append("")
                continue
            se = "" if e["se"] is None else f" ± {e['se']:.3g}"
            cells.append(f"{e['mean']:.4g}{se} ({e['passed']}/{e['n']})")
        table.add_row(*cells)
    console.print(table)
    for j, k in enumerate(preds):
        console.print(untrusted(f"P{j + 1}: {k}"), highlight=False, soft_wrap=True)
