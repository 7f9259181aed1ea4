"""``neurothermo analyze``: the template runs as is, a transformer spec works, bad specs are named."""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neurothermo.cli import app

cli = CliRunner()

TRANSFORMER = '''
import torch
from torch import nn
from neurothermo.models.transformer import TinyTransformer

def model():
    return TinyTransformer(12, d_model=16, n_layers=2, n_heads=2, max_len=8,
                           generator=torch.Generator().manual_seed(0))

def _lm(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

loss_fn = _lm

def data():
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 12, (64, 9), generator=g)
    return seq[:, :-1], seq[:, 1:]
'''


def _template(tmp_path: Path) -> Path:
    res = cli.invoke(app, ["analyze", "--template"])
    assert res.exit_code == 0
    spec = tmp_path / "spec.py"
    spec.write_text(res.output)
    return spec


def _summary(out: Path) -> tuple[Path, dict]:
    (run_dir,) = (out / "analyze").iterdir()
    return run_dir, json.loads((run_dir / "summary.json").read_text())


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))


def test_template_runs_end_to_end_with_training_and_comparison(tmp_path: Path) -> None:
    spec = _template(tmp_path)
    other = tmp_path / "other.py"
    other.write_text(spec.read_text().replace("nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)",
                                              "nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)"))
    out = tmp_path / "runs"
    res = cli.invoke(app, ["analyze", str(spec), "--steps", "30", "--k", "2", "--compare",
                           str(other), "--out", str(out)])
    assert res.exit_code == 0, res.output
    run_dir, s = _summary(out)
    f = s["figures"]
    kinds = {x["kind"] for x in f["symmetries"]["found"]}
    assert "rescale" in kinds  # a ReLU MLP's hidden units rescale
    assert all(x["change"] < 1e-4 for x in f["symmetries"]["found"])
    assert len(f["eigenvalues"]) == 2 and f["eigenvalues"][0] >= f["eigenvalues"][1] > 0
    assert f["lr_times_lambda_max"] == pytest.approx(0.1 * f["eigenvalues"][0])
    ent = f["entropic"]
    assert ent["temperature"] == pytest.approx(0.1 / 32) and ent["noise"] > 0
    assert len(f["alignment"]["rows"]) >= 1 and len(f["balance"]["pair_ratio"]) >= 1
    page = run_dir / "analysis.html"
    parser = _Tags()
    parser.feed(page.read_text())
    imgs = [a["src"] for t, a in parser.tags if t == "img"]
    assert len(imgs) == 2 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "script" not in [t for t, _ in parser.tags]
    if shutil.which("chromium"):  # the page renders in a real browser
        shot = tmp_path / "a.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        f"--screenshot={shot}", "--window-size=900,1200", page.as_uri()],
                       capture_output=True, timeout=120)
        assert shot.stat().st_size > 10_000


def test_transformer_spec(tmp_path: Path) -> None:
    spec = tmp_path / "tf.py"
    spec.write_text(TRANSFORMER)
    out = tmp_path / "runs"
    res = cli.invoke(app, ["analyze", str(spec), "--batch-size", "8", "--k", "1", "--out",
                           str(out)])
    assert res.exit_code == 0, res.output
    _, s = _summary(out)
    f = s["figures"]
    assert f["samples"] == 64 and f["eigenvalues"][0] > 0 and f["entropic"]["trace_sigma"] > 0
    assert "found" in f["symmetries"] or "error" in f["symmetries"]


@pytest.mark.parametrize(("body", "message"), [
    ("import torch\ndef model(): return torch.nn.Linear(2, 2)\n", "does not define loss_fn, data"),
    ("loss_fn = None\ndef model(): return 3\ndef data(): return None\n", "returned int, not an nn.Module"),
    ("import torch\nloss_fn = torch.nn.MSELoss()\ndef model(): return torch.nn.Linear(3, 2)\n"
     "def data(): return torch.randn(8, 5), torch.randn(8, 2)\n", "cannot be computed"),
    ("def model(:\n", "syntax error at line 1"),
    ("raise RuntimeError('boom')\n", "raised while loading: RuntimeError: boom"),
])
def test_bad_specs_are_named_before_any_folder(tmp_path: Path, body: str, message: str) -> None:
    spec = tmp_path / "bad.py"
    spec.write_text(body)
    res = cli.invoke(app, ["analyze", str(spec), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "runs").exists()


def test_missing_spec_and_help_says_it_executes(tmp_path: Path) -> None:
    res = cli.invoke(app, ["analyze", str(tmp_path / "nope.py")])
    assert res.exit_code == 2 and "is not a file" in res.output
    res = cli.invoke(app, ["analyze", "--help"])
    assert "EXECUTES" in res.output
