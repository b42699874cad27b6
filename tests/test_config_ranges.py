"""Issue 24: every numeric field of every config dataclass declares its allowed range (``typed.ranged``),
and the one typed builder refuses NaN, inf and out-of-range values in one line naming the key and the
range. A numeric field added later without a range fails ``test_every_numeric_field_has_a_range``."""
from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest

from redi_megatron.config.loader import apply_overrides
from redi_megatron.config.schema import RunConfig
from redi_megatron.errors import UserError
from redi_megatron.typed import RANGES, Checker, field_range, hints


def _config_classes() -> list[type]:
    from redi_megatron.losses.registry import _REGISTRY, _load_builtin_losses  # noqa: PLC2701

    _load_builtin_losses()
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for tp in hints(cls).values():
            for t in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(t):
                    walk(t)

    walk(RunConfig)
    for spec in _REGISTRY.values():
        walk(spec.config_cls)
    return seen


def _numeric(tp: typing.Any) -> typing.Optional[type]:
    for t in (tp, *typing.get_args(tp)):
        if t in (int, float):
            return t
    return None


FIELDS = [(cls, name, _numeric(tp)) for cls in _config_classes() for name, tp in hints(cls).items()
          if _numeric(tp) is not None]


def test_the_walk_finds_every_section_and_loss():
    from redi_megatron.losses.registry import get_loss

    classes = {cls for cls, _, _ in FIELDS}
    assert {get_loss(n).config_cls for n in ("redi", "dpo", "simpo")} <= classes  # loss hyper-parameters
    assert {"DataConfig", "OptimizerConfig", "TrainConfig", "CheckpointConfig", "CollapseConfig", "LoggingConfig",
            "ModelConfig", "ParallelConfig"} <= {c.__name__ for c in classes}


@pytest.mark.parametrize("cls,name,tp", FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in FIELDS])
def test_every_numeric_field_has_a_range(cls, name, tp):
    allowed = field_range(cls, name)
    assert allowed in RANGES, (f"{cls.__name__}.{name} declares no range: use typed.ranged(default, "
                               f"one of {list(RANGES)})")
    check = Checker()
    for bad in (math.nan, math.inf, -math.inf):
        if tp is float:
            with pytest.raises(UserError, match=rf"'x\.{name}' must be a finite number"):
                check.section({name: bad}, cls, "x.", "test")
    for value in (-1, 0):
        ok = allowed == "finite" or RANGES[allowed](value)
        if ok:
            check.section({name: value}, cls, "x.", "test")
        else:
            with pytest.raises(UserError, match=rf"'x\.{name}' must be a finite number {re.escape(allowed)}"):
                check.section({name: value}, cls, "x.", "test")
    check.section({name: getattr(cls(), name)}, cls, "x.", "test")  # the default itself is in range


@pytest.mark.parametrize("override,needle", [
    ("optimizer.lr=.nan", "'optimizer.lr' must be a finite number >=0"),
    ("optimizer.lr=-1e-3", "'optimizer.lr' must be a finite number >=0"),
    ("optimizer.lr=.inf", "'optimizer.lr' must be a finite number >=0"),
    ("train.epochs=.nan", "'train.epochs' must be a finite number >0"),
    ("checkpoint.save_interval=-4", "'checkpoint.save_interval' must be a finite number >=0"),
    ("checkpoint.keep_last=-1", "'checkpoint.keep_last' must be a finite number >=0"),
])
def test_the_issue_probes_are_one_line(override, needle):
    with pytest.raises(UserError) as e:
        apply_overrides(RunConfig(), [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_ranges_are_in_the_docs():
    """docs/training.md lists every range (a field given a range later must be listed there too)."""
    import pathlib

    docs = " ".join(pathlib.Path(__file__).resolve().parent.parent.joinpath("docs", "training.md").read_text().split())
    for cls, name, _ in FIELDS:
        allowed = field_range(cls, name)
        assert f"{name}` {allowed}" in docs or f"{name}` ({cls.__name__[:-6].lower()}) {allowed}" in docs, \
            f"{cls.__name__}.{name} ({allowed}) is not listed under 'Allowed ranges' in docs/training.md"
