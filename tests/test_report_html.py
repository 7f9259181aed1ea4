"""report.html: self-contained, escaped, every figure loads (headless Chromium); resumable reproduce."""
from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neurothermo.cli import app
from neurothermo.htmlreport import collect_runs, write_report
from neurothermo.runner import run_experiment
from neurothermo.runstore import read_status

cli = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")
EVIL = '<script>alert(1)</script>"\'&<img src=x onerror=alert(2)>'


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _figure_run(cfg, ctx) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    ctx.savefig(fig, "line")
    ctx.record(slope=1.0, label=EVIL)
    ctx.predict("slope is one", 1.0, 1.0, 0.01, why="exact by construction")
    ctx.predict("GD control: no drift", 0.0, 0.0, 0.1, why="no noise, no force", control=True)
    ctx.predict(EVIL, 2.0, 1.0, 0.1, why=EVIL)


@pytest.fixture
def store(tmp_path: Path, temp_experiment) -> Path:
    temp_experiment("toy-figure", _figure_run)

    def boom(cfg, ctx) -> None:
        raise RuntimeError(EVIL)

    temp_experiment("toy-boom", boom)
    root = tmp_path / "runs"
    run_experiment("toy-figure", out=root)
    with pytest.raises(Exception, match="script"):
        run_experiment("toy-boom", out=root)
    damaged = root / "toy-damaged" / "20260101-000000-abcdef"
    damaged.mkdir(parents=True)
    (damaged / "status").write_text("done\n")
    (damaged / "summary.json").write_text('{"predictions": [')
    return root


def test_report_is_self_contained_escaped_and_complete(store: Path) -> None:
    path = write_report(store)
    assert path == store / "report.html"
    raw = path.read_text(encoding="utf-8")
    page = _parse(path)
    tags = [t for t, _ in page.tags]
    assert "script" not in tags  # the malicious strings stayed text
    assert "<script>alert(1)</script>" not in raw and "&lt;script&gt;alert(1)" in raw
    sections = [a.get("id") for t, a in page.tags if t == "section"]
    assert sections == ["toy-boom", "toy-damaged", "toy-figure"]
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(imgs) == 1 and imgs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(imgs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [a for t, a in page.tags if t in ("link", "iframe") or
                (t == "img" and not str(a.get("src", "")).startswith("data:"))]
    text = " ".join(" ".join(page.text).split())
    assert "cannot be read" in text and "not valid JSON" in text  # the damaged folder, and why
    # overview: toy-figure holds 1 of 2 predictions and 1 of 1 controls
    assert "toy-figure failed done" not in text
    rows = [r for r in raw.split("<tr>") if 'href="#toy-figure"' in r]
    assert rows and "<td>1 / 2</td><td>1 / 1</td>" in rows[0]
    views = {v.experiment: v for v in collect_runs(store)}
    assert views["toy-boom"].status == "failed" and views["toy-damaged"].error


def test_report_command_and_bad_folder(store: Path, tmp_path: Path) -> None:
    res = cli.invoke(app, ["report", str(store), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").is_file()
    res = cli.invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "is not a folder" in res.output


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt)")
def test_every_figure_loads_in_headless_chromium(store: Path, tmp_path: Path) -> None:
    report = write_report(store)
    srcs = [a["src"] for t, a in _parse(report).tags if t == "img"]
    # A harness page shows the report's images and reports, after they load, how many decoded.
    imgs = "".join(f'<img src="{s}">' for s in srcs)
    harness = tmp_path / "harness.html"
    harness.write_text(
        f"<html><body>{imgs}<p id=r>pending</p><script>window.addEventListener('load',()=>{{"
        "const ok=[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;"
        "document.getElementById('r').textContent='loaded '+ok+' of '+document.images.length;"
        "});</script></body></html>")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    out = subprocess.run(["chromium", *flags, "--dump-dom", harness.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert f"loaded {len(srcs)} of {len(srcs)}" in out.stdout, out.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1000,1400",
                    report.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(io.BytesIO(shot.read_bytes()))
    assert img.size == (1000, 1400) and len(set(img.convert("L").getdata())) > 10  # drawn


def _only(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    from neurothermo.experiments import base

    monkeypatch.setattr(base, "REGISTRY", {n: base.REGISTRY[n] for n in names})


def test_reproduce_keeps_finished_runs_and_reruns_failed(tmp_path: Path, temp_experiment,
                                                         monkeypatch) -> None:
    calls: list[str] = []
    flaky = {"fail": True}

    def ok(cfg, ctx) -> None:
        calls.append("ok")
        ctx.predict("one", 1.0, 1.0, 0.0)

    def sometimes(cfg, ctx) -> None:
        calls.append("flaky")
        if flaky["fail"]:
            raise RuntimeError("not this time")

    temp_experiment("toy-ok", ok)
    temp_experiment("toy-flaky", sometimes)
    _only(monkeypatch, "toy-ok", "toy-flaky")
    out = str(tmp_path / "runs")
    res = cli.invoke(app, ["reproduce", "--quick", "--out", out])
    assert res.exit_code == 1 and calls == ["flaky", "ok"]
    assert (tmp_path / "runs" / "report.html").is_file()
    flaky["fail"] = False
    res = cli.invoke(app, ["reproduce", "--quick", "--out", out])
    assert res.exit_code == 0, res.output
    assert calls == ["flaky", "ok", "flaky"]  # the finished run is kept, the failed one rerun
    assert "kept" in res.output
    res = cli.invoke(app, ["reproduce", "--quick", "--out", out, "--only", "toy-ok", "--rerun"])
    assert res.exit_code == 0 and calls[-1] == "ok" and len(calls) == 4
    res = cli.invoke(app, ["reproduce", "--quick", "--full", "--out", out])
    assert res.exit_code == 2 and "one of --quick and --full" in res.output


CHILD = textwrap.dedent("""
    import sys, time
    from dataclasses import dataclass
    OUT, MARKER = sys.argv[1], sys.argv[2]
    from neurothermo.config import setting
    from neurothermo.experiments.base import Experiment, REGISTRY, register, get_experiment
    get_experiment("entropic-flow")
    REGISTRY.clear()

    @dataclass(frozen=True)
    class Cfg:
        steps: int = setting(1, "steps", min=1)

    def fast(cfg, ctx):
        ctx.predict("one", 1.0, 1.0, 0.0)

    def slow(cfg, ctx):
        open(MARKER, "w").write("in the second experiment")
        for step in range(10**6):
            ctx.log(step, x=1.0)
            time.sleep(0.01)

    register(Experiment(name="a-fast", title="", config=Cfg, quick=Cfg(), full=Cfg(), run=fast))
    register(Experiment(name="b-slow", title="", config=Cfg, quick=Cfg(), full=Cfg(), run=slow))
    if len(sys.argv) > 3:
        REGISTRY["b-slow"] = Experiment(name="b-slow", title="", config=Cfg, quick=Cfg(),
                                        full=Cfg(), run=fast)
    sys.argv = ["neurothermo", "reproduce", "--quick", "--out", OUT]
    from neurothermo.cli import main
    main()
""")


@pytest.mark.slow
def test_sigkill_mid_reproduce_loses_no_finished_run(tmp_path: Path) -> None:
    out, marker = tmp_path / "runs", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (fast,) = (out / "a-fast").iterdir()
    (killed,) = (out / "b-slow").iterdir()
    assert read_status(fast) == "done" and read_status(killed) == "running"  # killed: no handler
    res = subprocess.run([sys.executable, "-c", CHILD, str(out), str(marker), "finish"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert list((out / "a-fast").iterdir()) == [fast]  # the finished run was kept, not redone
    assert len(list((out / "b-slow").iterdir())) == 2  # the killed one ran again
    assert (out / "report.html").is_file()
