"""Experiment settings: frozen dataclasses with typed, range-checked fields and ``key=value`` overrides.

An experiment declares its settings as a frozen dataclass whose fields are made with :func:`setting`
(a default, a help text and optional bounds / choices). :func:`apply_overrides` parses the CLI's
``--set key=value`` strings against the field types, and :func:`validate_config` checks bounds, so
a typo or a wrong type is an error naming the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting is unknown, has the wrong type, or is out of range."""


def setting(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A dataclass field with a help text and optional bounds (inclusive) or choices.

    The CLI shows the help, bounds and choices, and every preset and override is checked against
    them (:class:`ConfigError`) before a run starts.

    Args:
        default: the default value (use tuples, not lists, for sequences).
        help: the help text.
        min: the smallest allowed value (inclusive); None: no bound.
        max: the largest allowed value (inclusive); None: no bound.
        choices: the allowed values; None: any of the field's type.

    Returns:
        A ``dataclasses.field`` carrying the metadata.

    Raises:
        TypeError: a list or dict default.

    Example:
        >>> import dataclasses
        >>> from neurothermo.experiments import setting
        >>> @dataclasses.dataclass(frozen=True)
        ... class Cfg:
        ...     lr: float = setting(0.1, "learning rate η", min=0.0)
        >>> dataclasses.fields(Cfg)[0].metadata["help"], Cfg().lr
        ('learning rate η', 0.1)
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence settings so configs stay frozen and hashable")
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"comma-separated list of {_type_name(args[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _parse(key: str, raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"setting {key!r}: cannot read {raw!r} as {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and raw.strip().lower() in ("none", "null", ""):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(key, raw, a)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == raw:
                return choice
        raise bad
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        parts = [p for p in raw.replace("(", "").replace(")", "").split(",") if p.strip()]
        return tuple(_parse(key, p.strip(), elem) for p in parts)
    if tp is bool:
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise bad
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise bad from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise bad from None
    if tp is str:
        return raw
    raise ConfigError(f"setting {key!r}: type {tp!r} cannot be set from the command line")


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` for every setting of a config class."""
    hints = typing.get_type_hints(cls)
    return [
        (f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    ]


def validate_config(cfg: Any) -> Any:
    """Check every field's type, bounds and choices; return ``cfg`` or raise :class:`ConfigError`."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        tp = hints[f.name]
        values = value if typing.get_origin(tp) is tuple else (value,)
        if typing.get_origin(tp) is tuple and len(values) == 0:
            raise ConfigError(f"setting {f.name!r}: needs at least one value")
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool) and typing.get_origin(tp) is not tuple and tp is not bool:
                raise ConfigError(f"setting {f.name!r}={v!r}: expected {_type_name(tp)}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"setting {f.name!r}={v!r}: must be a finite number")
            if isinstance(v, str) and "\x00" in v:
                raise ConfigError(f"setting {f.name!r}: contains a NUL character")
            lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
            if choices is not None and v not in choices:
                raise ConfigError(f"setting {f.name!r}={v!r}: expected one of {choices}")
            if lo is not None and v < lo:
                raise ConfigError(f"setting {f.name!r}={v!r}: must be >= {lo}")
            if hi is not None and v > hi:
                raise ConfigError(f"setting {f.name!r}={v!r}: must be <= {hi}")
    check = getattr(cfg, "check", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:  # e.g. a path setting too long for the file system
            keys = [f.name for f in dataclasses.fields(cfg)
                    if exc.filename is not None and str(getattr(cfg, f.name)) == str(exc.filename)]
            what = f"setting {keys[0]!r}" if keys else "a path setting"
            raise ConfigError(f"{what} cannot be used as a path: {exc.strerror or exc}; "
                              "give an existing folder with a shorter name") from None
    return cfg


def apply_overrides(cfg: C, overrides: typing.Iterable[str]) -> C:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied and validated."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            raise ConfigError(f"unknown setting {key!r}; valid keys: {', '.join(names)}")
        changes[key] = _parse(key, raw.strip(), hints[key])
    new = dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
    checked: C = validate_config(new)
    return checked


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
