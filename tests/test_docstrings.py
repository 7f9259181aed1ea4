"""Every exported callable of the public namespaces documents itself completely (Google style).

Functions: ``Args:`` naming every parameter, ``Returns:`` unless annotated ``-> None``,
``Raises:`` (entries ``Type: description``, as the API reference parses them; ``Nothing:`` for a
function that raises nothing of its own) and a ``>>>`` example. Classes users construct: the
constructor's ``Args:`` (every parameter), ``Raises:`` and an example. Result records (frozen
dataclasses the API returns) and protocols: ``Attributes:`` naming every field. Exceptions and
warnings: a docstring saying when they are raised. The examples themselves are executed by
``tests/test_docstring_examples.py``.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest

# the namespaces users import (README, CONTRIBUTING, docs/api/); each has a static __all__
PUBLIC = (
    "neurothermo", "neurothermo.alignment", "neurothermo.curvature", "neurothermo.data",
    "neurothermo.entropic", "neurothermo.experiments", "neurothermo.gradstats",
    "neurothermo.gradstats.rules", "neurothermo.models", "neurothermo.monitor",
    "neurothermo.symmetry",
)

# Frozen dataclasses that users build themselves (an argument of the API, not its result): they
# are checked as classes (constructor Args, Raises, example), not as records.
CONSTRUCTED = {
    "EntropicRegularizer", "Preconditioner", "Experiment", "Rule", "RunContext",
}

# Names whose docstrings are not complete yet. The list may only shrink: a name listed here whose
# docstring has become complete fails the test, so that it is removed from the list.
PENDING: set[str] = set()

_SECTION = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")
_ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?:\([^)]*\))?\s*:")


def sections(doc: str) -> dict[str, list[str]]:
    """``{title: body lines}`` of a Google-style docstring (body dedented to its first entry)."""
    out: dict[str, list[str]] = {}
    lines = doc.expandtabs().splitlines()
    i = 0
    while i < len(lines):
        m = _SECTION.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, body = len(m.group(1)), []
        i += 1
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        out[m.group(2)] = body
    return out


def documented_names(body: list[str]) -> set[str]:
    """Names documented in an Args/Attributes body: ``name: ...``, ``name (type): ...``,
    ``a, b: ...`` at the entries' indentation (continuation lines are indented further)."""
    entries = [ln for ln in body if ln.strip()]
    if not entries:
        return set()
    indent = min(len(ln) - len(ln.lstrip()) for ln in entries)
    names: set[str] = set()
    for ln in entries:
        if len(ln) - len(ln.lstrip()) != indent:
            continue
        m = _ENTRY.match(ln.strip())
        if m:
            names.update(n.strip().lstrip("*") for n in m.group(1).split(","))
    return names


_RAISES_ENTRY = re.compile(r"^[A-Za-z_][\w.]*(\s*,\s*[A-Za-z_][\w.]*)*:(\s|$)")


def _malformed_entries(body: list[str]) -> list[str]:
    """Lines of a Raises body that start an entry without ``Type:`` (``Nothing:`` says that a
    function raises nothing of its own). The API reference (griffe) reads every line at the
    entries' indentation as a new entry, so a continuation line must be indented further."""
    entries = [ln for ln in body if ln.strip()]
    if not entries:
        return ["(empty)"]
    indent = min(len(ln) - len(ln.lstrip()) for ln in entries)
    return [ln.strip() for ln in entries
            if len(ln) - len(ln.lstrip()) == indent and not _RAISES_ENTRY.match(ln.strip())]


def _parameters(obj: Callable[..., Any]) -> tuple[list[str], Any]:
    sig = inspect.signature(obj)
    names = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")]
    return names, sig.return_annotation


def _record_fields(name: str, obj: Any) -> list[str] | None:
    """The fields a record documents under ``Attributes:`` (a frozen-dataclass result, or a
    Protocol's attributes); None for anything else."""
    if not inspect.isclass(obj) or name in CONSTRUCTED:
        return None
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    if getattr(obj, "_is_protocol", False):
        return list(getattr(obj, "__annotations__", {}))
    return None


def problems(name: str, obj: Any) -> list[str]:
    """What the docstring of ``obj`` (exported as ``name``) lacks; empty when complete."""
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return ["no docstring"]
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return []  # an exception or warning: its docstring says when it is raised
    s = sections(doc)
    out: list[str] = []
    fields = _record_fields(name, obj)
    if fields is not None:
        missing = [f for f in fields if f not in documented_names(s.get("Attributes", []))]
        if missing:
            out.append(f"Attributes lacks {missing}")
        return out
    params, returns = _parameters(obj)
    if params:
        missing = [p for p in params if p not in documented_names(s.get("Args", []))]
        if "Args" not in s:
            out.append("no Args section")
        elif missing:
            out.append(f"Args lacks {missing}")
    if (not inspect.isclass(obj) and returns not in (None, "None")
            and "Returns" not in s and "Yields" not in s):
        out.append("no Returns section")
    if "Raises" not in s:
        out.append("no Raises section")
    elif bad := _malformed_entries(s["Raises"]):
        out.append(f"Raises entries not 'Type: description': {bad}")
    if ">>>" not in doc:
        out.append("no >>> example")
    return out


def exported() -> dict[str, Any]:
    """``{qualified export name: object}`` for every callable in the public ``__all__`` lists
    (an object exported from several namespaces once, under the first)."""
    seen: dict[int, str] = {}
    out: dict[str, Any] = {}
    for mod_name in PUBLIC:
        mod = importlib.import_module(mod_name)
        assert hasattr(mod, "__all__"), f"{mod_name} has no static __all__"
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not callable(obj) or id(obj) in seen:
                continue
            seen[id(obj)] = name
            out[f"{mod_name}.{name}"] = obj
    return out


def test_every_public_callable_is_fully_documented() -> None:
    found = exported()
    assert len(found) > 100  # the walk reaches every namespace (118 callables when written)
    lacking = {q: p for q, obj in found.items() if (p := problems(q.rsplit(".", 1)[1], obj))}
    stale = sorted(n for n in PENDING if not any(q.endswith("." + n) for q in lacking))
    assert stale == [], f"complete now, remove from PENDING: {stale}"
    lacking = {q: p for q, p in lacking.items() if q.rsplit(".", 1)[1] not in PENDING}
    report = "\n".join(f"  {q}: {'; '.join(p)}" for q, p in sorted(lacking.items()))
    assert lacking == {}, f"incomplete docstrings:\n{report}"


# --- the check itself can fail -----------------------------------------------------------------

def _good(model: int, *, lr: float = 0.1) -> float:
    """Scale.

    Args:
        model: a number.
        lr (float): the step.

    Returns:
        ``model·lr``.

    Raises:
        Nothing: of its own.

    Example:
        >>> _good(2)
        0.2
    """
    return model * lr


def _lacks_a_parameter(model: int, *, lr: float = 0.1, steps: int = 1) -> float:
    """Scale.

    Args:
        model: a number.
        lr: the step, documented over two lines so that the continuation
            ``steps: not an entry`` is not mistaken for one.

    Returns:
        ``model·lr``.

    Raises:
        Nothing: of its own.

    Example:
        >>> _lacks_a_parameter(2)
        0.2
    """
    return model * lr * steps


def _raises_in_prose(model: int) -> int:
    """Identity.

    Args:
        model: a number.

    Returns:
        ``model``.

    Raises:
        nothing of its own; a ``TypeError`` from
        torch, which propagates.

    Example:
        >>> _raises_in_prose(1)
        1
    """
    return model


def _prose_only(model: int) -> int:
    """Returns ``model`` (see the module docstring); ``model`` is a number. Raises nothing."""
    return model


@dataclasses.dataclass(frozen=True)
class _Record:
    """A result.

    Attributes:
        value: the estimate.
    """

    value: float
    stderr: float


class _Thing:
    """Builds things.

    Args:
        size: how many.

    Raises:
        ValueError: size < 1.

    Example:
        >>> _Thing(2, seed=0).size
        2
    """

    def __init__(self, size: int, *, seed: int = 0) -> None:
        self.size = size


@pytest.mark.parametrize(("obj", "expected"), [
    (_good, []),
    (_lacks_a_parameter, ["Args lacks ['steps']"]),
    (_prose_only, ["no Args section", "no Returns section", "no Raises section",
                   "no >>> example"]),
    (_raises_in_prose, ["Raises entries not 'Type: description': ["
                        "'nothing of its own; a ``TypeError`` from', 'torch, which propagates.']"]),
    (_Record, ["Attributes lacks ['stderr']"]),
    (_Thing, ["Args lacks ['seed']"]),
])
def test_the_check_catches_incomplete_docstrings(obj: Any, expected: list[str]) -> None:
    assert problems(obj.__name__, obj) == expected


def test_the_check_fails_on_an_incomplete_export(monkeypatch: pytest.MonkeyPatch) -> None:
    # a deliberately bad docstring on a real export makes the walk over __all__ fail
    import neurothermo

    monkeypatch.setattr(neurothermo.hvp, "__doc__", "Hessian-vector product. See the module docstring.")
    with pytest.raises(AssertionError, match=r"neurothermo\.hvp: no Args section"):
        test_every_public_callable_is_fully_documented()
