from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from neurothermo.config import (
    ConfigError,
    apply_overrides,
    describe,
    setting,
    to_dict,
    validate_config,
)


@dataclass(frozen=True)
class Cfg:
    lr: float = setting(0.1, "learning rate", min=0.0, max=2.0)
    steps: int = setting(10, "steps", min=1)
    opt: Literal["sgd", "gd"] = setting("sgd", "optimizer")
    flag: bool = setting(False, "a switch")
    lrs: tuple[float, ...] = setting((0.1, 0.2), "sweep", min=0.0)
    depth: int | None = setting(None, "optional depth", min=1)
    name: str = setting("x", "free text")


def test_overrides_parse_each_type() -> None:
    c = apply_overrides(Cfg(), ["lr=0.5", "steps=3", "opt=gd", "flag=true", "lrs=0.3,0.4,0.5",
                                "depth=4", "name=hello"])
    assert (c.lr, c.steps, c.opt, c.flag, c.lrs, c.depth, c.name) == (
        0.5, 3, "gd", True, (0.3, 0.4, 0.5), 4, "hello")
    assert apply_overrides(c, ["depth=none"]).depth is None
    assert Cfg().lr == 0.1  # the preset itself is not modified (frozen copy)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'lrr'; valid keys: lr, steps"):
        apply_overrides(Cfg(), ["lrr=1"])


@pytest.mark.parametrize(
    ("item", "pattern"),
    [
        ("steps=2.5", r"'steps': cannot read '2.5' as int"),
        ("lr=fast", r"'lr': cannot read 'fast' as float"),
        ("opt=adam", r"'opt': cannot read 'adam' as one of 'sgd', 'gd'"),
        ("flag=maybe", r"'flag': cannot read 'maybe' as bool"),
        ("lr=3", r"'lr'=3.0: must be <= 2.0"),
        ("steps=0", r"'steps'=0: must be >= 1"),
        ("lrs=0.1,-1", r"'lrs'=-1.0"),
        ("lr", r"not of the form key=value"),
    ],
)
def test_bad_values_name_key_value_and_type(item: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(Cfg(), [item])


def test_check_hook_and_helpers() -> None:
    @dataclass(frozen=True)
    class Range:
        lo: float = setting(1.0, "low")
        hi: float = setting(2.0, "high")

        def check(self) -> None:
            if self.lo >= self.hi:
                raise ValueError("lo must be < hi")

    with pytest.raises(ConfigError, match="lo must be < hi"):
        apply_overrides(Range(), ["lo=3"])
    assert validate_config(Range()) == Range()
    assert [row[0] for row in describe(Cfg)] == ["lr", "steps", "opt", "flag", "lrs", "depth", "name"]
    assert to_dict(Cfg())["lrs"] == [0.1, 0.2]
    with pytest.raises(TypeError, match="use tuples"):
        setting([1, 2], "a list")
