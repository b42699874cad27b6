"""Issue 24: the demo's settings (``DemoConfig`` and the dataclasses under it) and ``EvalConfig`` are walked
like the run config: every numeric field declares its range (``typed.ranged``), and building or validating
refuses NaN, inf and out-of-range values in one line naming the field. A numeric field added later without
a range fails ``test_every_numeric_field_has_a_range``."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from redi_megatron.demo.config import DemoConfig, StageBudget, config_for
from redi_megatron.errors import UserError
from redi_megatron.eval.config import EvalConfig
from redi_megatron.typed import RANGES, field_range, hints


def _classes(root: type) -> list[type]:
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls not in seen:
            seen.append(cls)
            for tp in hints(cls).values():
                for t in (tp, *typing.get_args(tp)):
                    if dataclasses.is_dataclass(t):
                        walk(t)

    walk(root)
    return seen


def _numeric(tp: typing.Any) -> typing.Optional[type]:
    for t in (tp, *(a for a in typing.get_args(tp) if typing.get_origin(tp) is typing.Union)):
        if t in (int, float):
            return t
    return None


FIELDS = [(cls, name, _numeric(tp)) for root in (DemoConfig, EvalConfig) for cls in _classes(root)
          for name, tp in hints(cls).items() if _numeric(tp) is not None]


def test_the_walk_finds_every_section():
    assert {"DemoConfig", "StageBudget", "EvalSettings", "TaskConfig", "DemoModelSpec", "EvalConfig"} <= {
        c.__name__ for c, _, _ in FIELDS}


@pytest.mark.parametrize("cls,name,tp", FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in FIELDS])
def test_every_numeric_field_has_a_range(cls, name, tp):
    assert field_range(cls, name) in RANGES, f"{cls.__name__}.{name} declares no range: use typed.ranged"


def _demo(**changes) -> DemoConfig:
    cfg = config_for(quick=True, seed=0)
    for dotted, value in changes.items():
        *path, leaf = dotted.split("__")
        obj = cfg
        for p in path:
            obj = getattr(obj, p)
        object.__setattr__(obj, leaf, value)  # the presets hold frozen sections too
    return cfg


@pytest.mark.parametrize("field,value,needle", [
    ("alpha", math.nan, "'alpha' must be a finite number (0,1]"),
    ("sft__lr", math.inf, "'sft.lr' must be a finite number >0"),
    ("redi__warmup_ratio", -0.1, "'redi.warmup_ratio' must be a finite number [0,1)"),
    ("eval__temperature", math.nan, "'eval.temperature' must be a finite number >=0"),
    ("eval__top_p", 1.5, "'eval.top_p' must be a finite number (0,1]"),
    ("task__error_rate", math.nan, "'task.error_rate' must be a finite number [0,1]"),
    ("model__norm_eps", 0.0, "'model.norm_eps' must be a finite number >0"),
    ("threads", 0, "'threads' must be a finite number >=1"),
])
def test_demo_settings_out_of_range_are_one_line(field, value, needle):
    with pytest.raises(UserError) as e:
        _demo(**{field: value}).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_presets_are_in_range():
    for quick in (False, True):
        for teacher in ("shortcut", "slips"):
            config_for(quick, 0, teacher).validate()
    with pytest.raises(TypeError):
        StageBudget()  # steps, batch and lr have no default: each preset says them


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", math.nan, "'temperature' must be a finite number >=0"),
    ("top_p", math.nan, "'top_p' must be a finite number (0,1]"),
    ("grade_timeout", math.inf, "'grade_timeout' must be a finite number >0"),
    ("gpu_memory_utilization", 1.5, "'gpu_memory_utilization' must be a finite number (0,1]"),
    ("grade_workers", 0, "'grade_workers' must be a finite number >=1"),
    ("max_model_len", 0, "'max_model_len' must be a finite number >=1"),
    ("num_shards", 0, "'num_shards' must be a finite number >=1"),
    ("seed", -1, "'seed' must be a finite number >=0"),
])
def test_eval_config_out_of_range_is_one_line(field, value, needle):
    with pytest.raises(UserError) as e:
        EvalConfig(model="m", out="o", **{field: value})
    assert needle in str(e.value) and "\n" not in str(e.value)
    EvalConfig(model="m", out="o")  # the defaults are in range
