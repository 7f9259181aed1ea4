"""The README's code tour runs as written (so the README stays true)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def tour() -> str:
    """The ```python block of the README's "Measure it in your own model" section."""
    section = README.read_text().split("## Measure it in your own model", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    return code


def test_readme_tour_runs(capsys) -> None:
    code = tour()
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "Tr Σ" in out and "rescale" in out and "λ_max" in out


@pytest.mark.slow
def test_readme_tour_type_checks_strictly(tmp_path: Path) -> None:
    # What a user's `mypy --strict` sees: the tour as their code, neurothermo as an installed typed
    # package (py.typed; errors inside a dependency are not the user's, hence follow_imports=silent,
    # which still type-checks the package to resolve every name and signature the tour uses).
    pytest.importorskip("mypy")
    import neurothermo

    script = tmp_path / "tour.py"
    script.write_text(tour())
    src = Path(neurothermo.__file__).resolve().parents[1]
    env = dict(os.environ)
    if "site-packages" not in src.parts:  # a source checkout: point mypy at it, not an older install
        env["MYPYPATH"] = str(src)
    cache = README.parent / ".mypy_cache" / "readme-strict"  # gitignored; reused between runs
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir",
         str(cache), "--python-executable", sys.executable, str(script)],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
