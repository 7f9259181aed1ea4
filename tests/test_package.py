"""The package is a library: a light measuring API, static exports, dependencies pointing inward."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import neurothermo

SRC = Path(neurothermo.__file__).resolve().parent


def test_import_loads_no_experiment_plot_or_cli_code() -> None:
    code = ("import sys, neurothermo; print(','.join(sorted(m for m in sys.modules if "
            "m.startswith(('neurothermo.experiments', 'neurothermo.cli', 'neurothermo.runner', "
            "'matplotlib', 'typer', 'rich', 'sklearn')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_is_static_and_complete() -> None:
    tree = ast.parse((SRC / "__init__.py").read_text())
    (static,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    assert isinstance(static, ast.List)  # a literal list: type checkers see the exports
    listed = [ast.literal_eval(e) for e in static.elts]
    public = {n for n, v in vars(neurothermo).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert set(listed) == public | {"__version__", "alignment"}
    assert len(listed) == len(set(listed))


PACKAGES = sorted(p.parent for p in SRC.glob("*/__init__.py") if not p.parent.name.startswith("_"))


def _static_all(init: Path) -> list[str] | None:
    tree = ast.parse(init.read_text())
    found = [n.value for n in tree.body if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    if len(found) != 1 or not isinstance(found[0], ast.List | ast.Tuple):
        return None
    return [ast.literal_eval(e) for e in found[0].elts]


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_every_public_subpackage_has_a_static_complete_all(pkg: Path) -> None:
    listed = _static_all(pkg / "__init__.py")
    assert listed is not None, f"{pkg.name}/__init__.py: __all__ must be one literal list"
    module = importlib.import_module(f"neurothermo.{pkg.name}")
    public = {n for n, v in vars(module).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)
              and getattr(v, "__module__", "").startswith("neurothermo")}
    assert len(listed) == len(set(listed))
    assert set(listed) >= public, f"{pkg.name}: public but not in __all__: {public - set(listed)}"
    missing = [n for n in listed if not hasattr(module, n)]
    assert missing == [], f"{pkg.name}: listed in __all__ but not defined: {missing}"


def test_framework_lives_in_its_own_namespace() -> None:
    from neurothermo import experiments

    for name in ("Experiment", "register", "RunContext", "Prediction", "setting",
                 "run_experiment", "ConfigError"):
        assert hasattr(experiments, name)
        assert not hasattr(neurothermo, name)


def _imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def test_no_module_imports_the_package_root() -> None:
    bad = []
    for path in SRC.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == SRC:
            continue
        for line, module, names in _imports_of(path):
            if module == "neurothermo" and any(n != "__version__" for n in names or ["*"]):
                subs = {p.stem for p in SRC.iterdir()}
                if not names or any(n not in subs for n in names):
                    bad.append(f"{path.relative_to(SRC)}:{line}")
    assert bad == [], f"import the defining module instead of the package root: {bad}"


def test_the_core_never_imports_the_edge() -> None:
    edge = ("neurothermo.experiments", "neurothermo.cli", "neurothermo.runner",  # _entry is edge
            "neurothermo.report", "neurothermo.htmlreport", "neurothermo.analyze",
            "neurothermo.sweep", "neurothermo.reproduce_dask")
    core = [p for p in SRC.rglob("*.py")
            if not p.relative_to(SRC).parts[0].startswith(("experiments", "cli", "runner",
                                                         "report", "htmlreport", "analyze",
                                                         "sweep", "reproduce_dask", "_entry"))]
    bad = [f"{p.relative_to(SRC)}:{line} imports {m}" for p in core
           for line, m, _ in _imports_of(p) if m.startswith(edge)]
    assert bad == []


def test_typed_marker_ships() -> None:
    assert (SRC / "py.typed").is_file()


def test_console_script_names_the_missing_extra() -> None:
    # typer hidden: the script says which extra to install instead of an ImportError traceback
    code = ("import sys; sys.modules['typer'] = None; from neurothermo._entry import main; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    assert "pip install 'neurothermo[experiments]'" in out.stderr and "Traceback" not in out.stderr


def test_monitor_helpers_use_no_private_state_of_the_monitor() -> None:
    # derive.py / noise.py and the other helpers get what they need passed in (Layout, LayerEma,
    # NoiseSetup) and return what changed; only monitor.py touches ThermoMonitor's own fields.
    mon_dir = SRC / "monitor"
    private = {t.attr for node in ast.walk(ast.parse((mon_dir / "monitor.py").read_text()))
               if isinstance(node, ast.Assign | ast.AnnAssign)
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
               for t in ([*t.elts] if isinstance(t, ast.Tuple) else [t])
               if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
               and t.value.id == "self" and t.attr.startswith("_")}
    assert {"_ema_layer", "_passive_ready", "_history"} <= private  # the parse found the fields
    bad = [f"{p.name}:{n.lineno} .{n.attr}" for p in mon_dir.glob("*.py") if p.name != "monitor.py"
           for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Attribute)
           and n.attr in private and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert bad == []


def test_one_loss_fn_alias() -> None:
    defs = [f"{p.relative_to(SRC)}:{n.lineno}" for p in SRC.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text()))
            if (isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "LossFn"
                                                  for t in n.targets))
            or (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                and n.target.id == "LossFn")]
    assert len(defs) == 1 and defs[0].startswith("_types.py:"), defs


def test_one_double_backward_hvp_kernel() -> None:
    # a torch.autograd.grad over a list of gradients with grad_outputs v is an HVP; it lives only in
    # curvature/hvp.py (double_backward_hvp), which the entropic terms import
    sites = [f"{p.relative_to(SRC)}:{n.lineno}" for p in SRC.rglob("*.py")
             for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("autograd.grad")
             and n.args and isinstance(n.args[0], ast.List | ast.ListComp)]
    assert len(sites) == 1 and sites[0].startswith("curvature/hvp.py:"), sites


def test_double_backward_hvp_matches_the_dense_hessian() -> None:
    import torch

    from neurothermo.curvature.hvp import double_backward_hvp

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a = a + a.T
    x = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)  # f linear in c
    f = 0.5 * x @ a @ x + c.sum() + x.sin().sum()
    g = list(torch.autograd.grad(f, [x, c], create_graph=True))
    v = [torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen,
                                                                        dtype=torch.float64)]
    hx, hc = double_backward_hvp(g, [x, c], v)
    dense = a - torch.diag(x.detach().sin())  # ∇² of ½xᵀAx + Σ sin x
    torch.testing.assert_close(hx, dense @ v[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(hc, torch.zeros(3, dtype=torch.float64))  # H_cc = 0, H_cx = 0
    (h0,) = double_backward_hvp([None], [x], [v[0]])
    assert torch.equal(h0, torch.zeros(4, dtype=torch.float64))


def test_no_file_cites_the_external_theory_notes() -> None:
    # the theory is stated in the project's own words in docs/theory.md (§1–§5): cite that
    root = SRC.parents[1]
    if not (root / "docs").is_dir():
        pytest.skip("not a source checkout (docs/ absent)")
    bad = [str(p.relative_to(root)) for d in ("src", "docs") for p in (root / d).rglob("*")
           if p.is_file() and p.suffix in {".py", ".md", ".txt", ".toml", ".json", ".html"}
           and "THEORY" in p.read_text(errors="replace")]
    assert bad == [], f"cite docs/theory.md §N instead of docs/theory.md: {bad}"
