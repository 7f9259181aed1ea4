"""The README's code tour runs as written (so the README stays true)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs(capsys) -> None:
    text = README.read_text()
    section = text.split("## Measure it in your own model", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "Tr Σ" in out and "rescale" in out and "λ_max" in out
