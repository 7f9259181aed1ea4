"""The experiment protocol: a settings dataclass with quick/full presets and a ``run`` function.

To add an experiment, write one module in ``neurothermo/experiments/`` that builds an
:class:`Experiment` and passes it to :func:`register`, and import that module in
``experiments/__init__.py``. ``run(cfg, ctx)`` receives the validated settings and a
:class:`RunContext` through which it streams metrics, saves figures, records summary figures and
checks theory predictions; it never touches files itself.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurothermo.runstore import Run

SENSES = ("equal", "at_most", "at_least")


@dataclass(frozen=True)
class Prediction:
    """One checked theory prediction.

    ``sense="equal"``: ``passed = |measured − predicted| <= tolerance``; ``"at_most"``:
    ``measured <= predicted + tolerance``; ``"at_least"``: ``measured >= predicted − tolerance``.
    With ``relative=True`` the tolerance is relative to ``|predicted|``. ``why`` says where the
    tolerance comes from (it is derived from the theory, not tuned). A non-finite measurement
    never passes. Made by :meth:`RunContext.predict` (through :meth:`check`).

    Attributes:
        name: the prediction's name.
        measured: the measured value.
        predicted: the theory's value.
        tolerance: the allowed deviation (absolute, or relative with ``relative``).
        passed: whether the check held.
        relative: the tolerance is relative to ``|predicted|``.
        why: where the tolerance comes from.
        sense: ``"equal"``, ``"at_most"`` or ``"at_least"``.
        control: a check on a control setting.

    ``control=True`` marks a check made on a control setting, where the theory says the effect
    must be absent (no gradient noise, full-batch GD, an untrained network, the cause switched
    off); the check is stated so that it passes when the effect is absent as predicted. Reports
    count the predictions that held and, separately, the controls that behaved as predicted.
    """

    name: str
    measured: float
    predicted: float
    tolerance: float
    passed: bool
    relative: bool = False
    why: str = ""
    sense: str = "equal"
    control: bool = False

    @classmethod
    def check(
        cls, name: str, measured: float, predicted: float, tolerance: float, *,
        relative: bool = False, why: str = "", sense: str = "equal", control: bool = False,
    ) -> Prediction:
        if sense not in SENSES:
            raise ValueError(f"sense must be one of {SENSES}, got {sense!r}")
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be finite and >= 0, got {tolerance!r}")
        measured, predicted = float(measured), float(predicted)
        bound = tolerance * abs(predicted) if relative else tolerance
        if sense == "equal":
            ok = abs(measured - predicted) <= bound
        elif sense == "at_most":
            ok = measured <= predicted + bound
        else:
            ok = measured >= predicted - bound
        ok = ok and math.isfinite(measured)
        return cls(name, measured, predicted, float(tolerance), bool(ok), relative, why, sense,
                   bool(control))


@dataclass(frozen=True)
class SweepPlan:
    """A sweep an experiment declares, run by ``neurothermo sweep NAME`` without ``--grid``.

    ``grid`` holds one ``key=spec`` string per axis, in the syntax of ``--grid``
    (``lr=0.1,0.2`` lists values, ``p=0.05:0.4:8`` is 8 evenly spaced values, ``...:8:log``
    geometrically spaced); ``seeds`` is the number of seeds per grid point. ``quick_grid`` and
    ``quick_seeds``, when given, replace them under ``--quick``. ``feeds`` names a setting of the
    experiment's own run that takes the sweep's folder, whose cells then replace a computation the
    run would otherwise do itself (``reproduce --workers/--scheduler`` runs the sweep first, then
    the run with ``--set FEEDS=SWEEP_FOLDER``).
    """

    grid: tuple[str, ...] = ()
    seeds: int = 1
    quick_grid: tuple[str, ...] | None = None
    quick_seeds: int | None = None
    feeds: str | None = None

    def for_preset(self, quick: bool) -> tuple[tuple[str, ...], int]:
        if quick:
            grid = self.grid if self.quick_grid is None else self.quick_grid
            return grid, self.seeds if self.quick_seeds is None else self.quick_seeds
        return self.grid, self.seeds


class MissingExtra(RuntimeError):
    """The experiment needs an optional extra that is not installed."""


@dataclass(frozen=True)
class Experiment:
    """A registered experiment.

    ``config`` is a frozen dataclass type built with :func:`neurothermo.config.setting`;
    ``quick`` and ``full`` are instances of it. ``cost`` documents what the full preset costs.
    ``requires`` lists importable module names and ``extra`` the pip extra that provides them;
    ``install`` overrides the install hint when the extra alone is not enough. ``sweep`` (optional)
    declares the grid over settings and seeds that ``neurothermo sweep NAME`` runs by default.
    The instance is a frozen record; :func:`register` makes it runnable by name.

    Args:
        name: the CLI name (``neurothermo run NAME``).
        title: a one-line title.
        config: the settings dataclass type.
        quick: the quick preset (an instance of ``config``; ``reproduce --quick``).
        full: the full preset.
        run: ``run(cfg, ctx)``, the experiment itself (``ctx`` a :class:`RunContext`).
        cost: what the full preset costs, measured.
        requires: importable module names it needs.
        extra: the pip extra that provides them.
        install: an install hint when the extra alone is not enough.
        threads: torch intra-op threads while it runs (restored after); None: torch's setting.
        sweep: the default sweep of ``neurothermo sweep NAME``, or None.

    Raises:
        Nothing: at construction; :func:`register` checks the presets.

    Example:
        >>> import dataclasses
        >>> from neurothermo.experiments import Experiment, setting
        >>> @dataclasses.dataclass(frozen=True)
        ... class Cfg:
        ...     n: int = setting(100, "number of terms", min=2)
        >>> exp = Experiment(name="toy", title="A toy", config=Cfg, quick=Cfg(10), full=Cfg(),
        ...                  run=lambda cfg, ctx: None)
        >>> exp.preset(quick=True), exp.missing()
        (Cfg(n=10), [])
    """

    name: str
    title: str
    config: type
    quick: Any
    full: Any
    run: Callable[[Any, RunContext], None]
    cost: str = ""
    requires: tuple[str, ...] = ()
    extra: str | None = None
    install: str = ""  # how to install what ``requires`` lists, when more than the extra is needed
    # torch intra-op threads while it runs (restored after). The built-in experiments train tiny
    # models, where a second thread only adds synchronisation (measured here: platonic-nonlinear's
    # quick preset took 22 s of CPU on one thread and over 3× that on two, with a busy second
    # core). None leaves torch's setting (experiments with large models).
    threads: int | None = 1
    sweep: SweepPlan | None = None  # the grid and seeds `neurothermo sweep NAME` runs by default

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def preset(self, quick: bool) -> Any:
        return self.quick if quick else self.full


REGISTRY: dict[str, Experiment] = {}


class UnknownExperiment(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def register(exp: Experiment) -> Experiment:
    """Add ``exp`` to the registry (``REGISTRY``) under its name; registering it again is a no-op.

    Args:
        exp: the :class:`Experiment`.

    Returns:
        ``exp`` itself.

    Raises:
        ValueError: another experiment is registered under the same name.
        TypeError: a preset that is not an instance of ``exp.config``.

    Example:
        >>> import dataclasses, tempfile
        >>> from neurothermo.experiments import (REGISTRY, Experiment, register, run_experiment,
        ...                                      setting)
        >>> @dataclasses.dataclass(frozen=True)
        ... class Cfg:
        ...     n: int = setting(100, "number of terms", min=2)
        >>> def run(cfg: Cfg, ctx) -> None:  # ctx: the RunContext
        ...     mean = sum(range(cfg.n)) / cfg.n
        ...     ctx.predict("mean", mean, (cfg.n - 1) / 2, 1e-12, why="exact arithmetic")
        >>> exp = register(Experiment(name="toy-mean", title="The mean of 0 … n−1", config=Cfg,
        ...                           quick=Cfg(10), full=Cfg(), run=run))
        >>> exp.name in REGISTRY
        True
        >>> del REGISTRY["toy-mean"]
    """
    if exp.name in REGISTRY and REGISTRY[exp.name] is not exp:
        raise ValueError(f"experiment {exp.name!r} is registered twice")
    for preset in (exp.quick, exp.full):
        if not isinstance(preset, exp.config):
            raise TypeError(f"{exp.name}: presets must be instances of {exp.config.__name__}")
    REGISTRY[exp.name] = exp
    return exp


def get_experiment(name: str) -> Experiment:
    """The registered experiment ``name`` (the built-in ones are registered on first use).

    Args:
        name: the experiment's name.

    Returns:
        Its :class:`Experiment`.

    Raises:
        KeyError: no experiment of that name (``UnknownExperiment``, listing the available ones).

    Example:
        >>> from neurothermo.experiments import get_experiment
        >>> get_experiment("layer-balance").name
        'layer-balance'
    """
    import neurothermo.experiments  # noqa: F401  (registers the built-in experiments)

    if name not in REGISTRY:
        raise UnknownExperiment(
            f"unknown experiment {name!r}; available: {', '.join(sorted(REGISTRY)) or '(none)'}"
        )
    return REGISTRY[name]


def all_experiments() -> list[Experiment]:
    """Every registered experiment, sorted by name (the built-in ones are registered on first use).

    Returns:
        The :class:`Experiment` s, by name.

    Raises:
        Nothing: of its own (the built-in experiments import their optional dependencies,
            matplotlib, transformers, scikit-learn, only when they run).

    Example:
        >>> from neurothermo.experiments import all_experiments
        >>> "entropic-flow" in [e.name for e in all_experiments()]
        True
    """
    import neurothermo.experiments  # noqa: F401

    return [REGISTRY[k] for k in sorted(REGISTRY)]


@dataclass
class RunContext:
    """What an experiment's ``run`` uses to talk to the outside world.

    :func:`run_experiment` builds it; ``run(cfg, ctx)`` calls ``ctx.log`` (metrics stream),
    ``ctx.record`` (summary figures), ``ctx.predict`` (checked predictions), ``ctx.savefig`` and
    ``ctx.track`` / ``ctx.progress`` (progress bars in the CLI).

    Args:
        run: the run folder's store (``neurothermo.runstore.Run``).
        seed: the run's seed.
        quick: whether the quick preset runs.
        progress_factory: ``(description, total) -> context manager yielding advance(n)``; None:
            silent.
        predictions: the predictions checked so far.
        figures: the figures recorded so far.
        figure_files: the PNG files written so far.

    Raises:
        ValueError: from :meth:`predict`: an unknown ``sense``, or a negative or non-finite
            tolerance (nothing at construction).

    Example:
        >>> import dataclasses, tempfile
        >>> from neurothermo.experiments import (REGISTRY, Experiment, register, run_experiment,
        ...                                      setting)
        >>> @dataclasses.dataclass(frozen=True)
        ... class Cfg:
        ...     n: int = setting(100, "number of terms", min=2)
        >>> def run(cfg: Cfg, ctx) -> None:  # ctx: the RunContext
        ...     mean = sum(range(cfg.n)) / cfg.n
        ...     ctx.predict("mean", mean, (cfg.n - 1) / 2, 1e-12, why="exact arithmetic")
        >>> exp = register(Experiment(name="toy-mean", title="The mean of 0 … n−1", config=Cfg,
        ...                           quick=Cfg(10), full=Cfg(), run=run))
        >>> res = run_experiment("toy-mean", quick=True, out=tempfile.mkdtemp(), overrides=["n=20"])
        >>> res.status, res.all_passed, res.summary["predictions"][0]["measured"]
        ('done', True, 9.5)
        >>> del REGISTRY["toy-mean"]  # (a doctest: leave the registry as it was)
    """

    run: Run
    seed: int
    quick: bool
    progress_factory: Callable[[str, int | None], Any] | None = None
    predictions: list[Prediction] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    figure_files: list[str] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return self.run.path

    def log(self, step: int | None = None, **values: Any) -> None:
        """Stream one record to ``metrics.jsonl``."""
        record = {"step": step, **values} if step is not None else dict(values)
        self.run.log_metrics(record)

    def record(self, **values: Any) -> None:
        """Add final figures (numbers, lists, small dicts) to ``summary.json``."""
        self.figures.update(values)

    def predict(
        self, name: str, measured: float, predicted: float, tolerance: float, *,
        relative: bool = False, why: str = "", sense: str = "equal", control: bool = False,
    ) -> Prediction:
        """Check a theory prediction (see :class:`Prediction`) and record it in ``summary.json``.

        ``control=True``: a check on a control setting, passing when the effect is absent.
        """
        p = Prediction.check(name, measured, predicted, tolerance, relative=relative, why=why,
                             sense=sense, control=control)
        self.predictions.append(p)
        return p

    def savefig(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``<name>.png`` atomically and close it."""
        import io

        import matplotlib.pyplot as plt

        from neurothermo.runstore import atomic_write_bytes

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        target = self.out_dir / f"{name}.png"
        atomic_write_bytes(target, buf.getvalue())
        self.figure_files.append(target.name)
        return target

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Context giving ``advance(n=1)``; a rich progress bar when run from the CLI."""
        if self.progress_factory is None:
            def ignore(n: int = 1) -> None:
                return None

            yield ignore
            return
        with self.progress_factory(description, total) as advance:
            yield advance

    def track(self, iterable: Iterable[Any], description: str, total: int | None = None) -> Iterator[Any]:
        """Iterate with a progress bar (CLI) or silently (library / tests)."""
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        with self.progress(description, total) as advance:
            for item in iterable:
                yield item
                advance(1)
