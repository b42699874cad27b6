"""YAML recipe loader: schema filling, type checks, unknown keys, overrides, includes, round trip."""
import dataclasses
import os

import pytest

from redi_megatron.config import (
    RunConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    save_resolved,
    to_dict,
)
from redi_megatron.config.loader import dump_yaml


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_recipe_fills_schema_and_keeps_defaults(tmp_path):
    path = write(tmp_path, "r.yaml", """
name: run1
optimizer:
  lr: 1e-6            # YAML 1.1 would read this as a string
  clip_grad: 2        # int widened to float
loss:
  name: redi
  params: {alpha: 0.8, neg_weighting_gamma: 1e-1}
train:
  max_steps: 7
  fp8: null
logging:
  collapse: {action: stop, window: 5}
""")
    cfg = load_config(path)
    assert cfg.name == "run1"
    assert cfg.optimizer.lr == 1e-6 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.clip_grad == 2.0 and isinstance(cfg.optimizer.clip_grad, float)
    assert cfg.loss.params == {"alpha": 0.8, "neg_weighting_gamma": 0.1}
    assert cfg.train.max_steps == 7 and cfg.train.fp8 is None
    assert cfg.logging.collapse.action == "stop" and cfg.logging.collapse.window == 5
    # untouched fields keep the dataclass defaults
    default = RunConfig()
    assert cfg.optimizer.weight_decay == default.optimizer.weight_decay
    assert cfg.logging.collapse.logp_drop == default.logging.collapse.logp_drop
    assert cfg.model == default.model


def test_empty_file_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "e.yaml", "# nothing\n")) == RunConfig()


@pytest.mark.parametrize("text, key, hint", [
    ("optimizr:\n  lr: 1.0\n", "'optimizr'", "'optimizer'"),
    ("optimizer:\n  lrr: 1.0\n", "'optimizer.lrr'", "'optimizer.lr'"),
    ("lr: 1.0\n", "'lr'", "'optimizer.lr'"),                       # key in the wrong section
    ("logging:\n  collapse:\n    windw: 3\n", "'logging.collapse.windw'", "'logging.collapse.window'"),
    ("model:\n  num_heads: 4\n", "'model.num_heads'", "num_attention_heads"),
])
def test_unknown_keys_name_key_file_and_suggestion(tmp_path, text, key, hint):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ValueError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and key in msg and hint in msg, msg


@pytest.mark.parametrize("text, needle", [
    ("parallel:\n  tp: 2.5\n", "'parallel.tp' must be int"),
    ("parallel:\n  tp: true\n", "'parallel.tp' must be int"),
    ("parallel:\n  tp: null\n", "'parallel.tp' must be int"),
    ("parallel:\n  sequence_parallel: 1\n", "'parallel.sequence_parallel' must be bool"),
    ("optimizer:\n  lr: '1e-6'\n", "'optimizer.lr' must be float"),
    ("optimizer:\n  lr: abc\n", "'optimizer.lr' must be float"),
    ("name: 123\n", "'name' must be str"),
    ("train:\n  max_steps: 1.5\n", "'train.max_steps' must be int or null"),
    ("loss:\n  params: [1, 2]\n", "'loss.params' must be a mapping"),
    ("optimizer: 3\n", "'optimizer' is a section"),
    ("train:\n  dtype: fp16\n", "'train.dtype' must be one of ['bf16', 'fp32']"),
    ("train:\n  fp8: mxfp8\n", "'train.fp8' must be one of 'delayed', 'current' or null"),
    ("logging:\n  collapse:\n    action: halt\n", "'logging.collapse.action' must be one of ['off', 'warn', 'stop']"),
    ("optimizer:\n  lr: 1.0\n  lr: 2.0\n", "duplicate key 'lr'"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("optimizer: {lr: [\n", "invalid YAML"),
])
def test_bad_values_fail_with_file_and_field(tmp_path, text, needle):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert needle in str(e.value) and path in str(e.value), str(e.value)


def test_missing_file():
    with pytest.raises(ValueError, match="config file not found"):
        load_config("/nonexistent/recipe.yaml")


def test_overrides_dotted_keys_and_yaml_scalars(tmp_path):
    path = write(tmp_path, "r.yaml", "loss:\n  name: redi\n  params: {alpha: 0.8, chosen_coef: 1.0}\n")
    cfg = load_config(path, ["optimizer.lr=1e-6", "loss.params.alpha=0.5", "parallel.tp=2",
                             "train.max_steps=null", "parallel.sequence_parallel=true", "name=x y",
                             "data.train_path=/d/pairs", "model={num_layers: 4}"])
    assert cfg.optimizer.lr == 1e-6
    assert cfg.loss.params == {"alpha": 0.5, "chosen_coef": 1.0}  # one entry set, the other kept
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    assert cfg.train.max_steps is None and cfg.name == "x y" and cfg.data.train_path == "/d/pairs"
    # a section given as a mapping updates only the keys it names
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == RunConfig().model.hidden_size
    # the whole free dict can be replaced; nested keys inside it are created
    cfg2 = apply_overrides(cfg, ["loss.params={beta: 0.1}", "loss.params.extra.deep=3"])
    assert cfg2.loss.params == {"beta": 0.1, "extra": {"deep": 3}}
    assert cfg.loss.params == {"alpha": 0.5, "chosen_coef": 1.0}  # the input is not mutated


@pytest.mark.parametrize("override, needle", [
    ("optimizer.lrr=1", "unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'"),
    ("lr=1", "did you mean 'optimizer.lr'"),
    ("parallel.tp=two", "'parallel.tp' must be int"),
    ("parallel.tp.x=1", "'parallel.tp' is a value"),
    ("train.dtype=fp16", "'train.dtype' must be one of"),
    ("optimizer.lr", "expected key=value"),
    ("=1", "is not a dotted key"),
    ("defaults=[a.yaml]", "only be used inside a recipe"),
])
def test_bad_overrides_name_the_override(tmp_path, override, needle):
    path = write(tmp_path, "r.yaml", "")
    with pytest.raises(ValueError) as e:
        load_config(path, [override])
    assert needle in str(e.value), str(e.value)
    if "=" in override and not override.startswith(("=", "defaults")):
        assert f"override {override!r}" in str(e.value)


def test_parse_override_values():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=1e-6") == ("a.b", 1e-6)
    assert parse_override("a.b=") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b='007'") == ("a.b", "007")
    assert parse_override("a.b=@raw") == ("a.b", "@raw")  # YAML cannot parse it: kept as written


def test_defaults_includes_merge_and_replace_free_dicts(tmp_path):
    write(tmp_path, "base/model.yaml", "model:\n  num_layers: 6\n  hidden_size: 96\n")
    write(tmp_path, "redi.yaml", """
defaults: [base/model]
model:
  hidden_size: 128
loss:
  name: redi
  params: {alpha: 0.8, chosen_coef: 1.0}
optimizer: {lr: 1.0e-6, clip_grad: 0.5}
""")
    dpo = write(tmp_path, "dpo.yaml", "defaults: redi.yaml\nloss:\n  name: dpo\n  params: {beta: 0.001}\n"
                                      "optimizer: {lr: 2.0e-7}\n")
    cfg = load_config(dpo)
    assert cfg.model.num_layers == 6 and cfg.model.hidden_size == 128   # two levels of includes
    assert cfg.optimizer.lr == 2e-7 and cfg.optimizer.clip_grad == 0.5  # sections merge key by key
    assert cfg.loss.name == "dpo" and cfg.loss.params == {"beta": 0.001}  # no REDI params inherited


def test_defaults_errors(tmp_path):
    a = write(tmp_path, "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ValueError, match="include cycle"):
        load_config(a)
    c = write(tmp_path, "c.yaml", "defaults: [missing.yaml]\n")
    with pytest.raises(ValueError, match=r"c\.yaml: 'defaults' entry 'missing.yaml' not found"):
        load_config(c)
    d = write(tmp_path, "d.yaml", "defaults: [{x: 1}]\n")
    with pytest.raises(ValueError, match="entries must be file paths"):
        load_config(d)
    # an error inside an included file names that file, not the including one
    write(tmp_path, "inc.yaml", "optimizer:\n  lrr: 1.0\n")
    e = write(tmp_path, "e.yaml", "defaults: [inc.yaml]\n")
    with pytest.raises(ValueError, match=r"inc\.yaml: unknown key 'optimizer.lrr'"):
        load_config(e)


def test_save_resolved_round_trip(tmp_path):
    path = write(tmp_path, "r.yaml", "loss:\n  name: simpo\n  params: {beta: 2.0, gamma: 1.0}\n")
    cfg = load_config(path, ["optimizer.lr=5e-7", "train.fp8=delayed", "train.max_steps=3",
                             "checkpoint.init_from=/ckpt"])
    out = save_resolved(cfg, str(tmp_path / "run" / "config.yaml"))
    assert os.listdir(tmp_path / "run") == ["config.yaml"]  # no temporary file left behind
    again = load_config(out)
    assert again == cfg
    text = open(out).read()
    for section in ("model:", "parallel:", "data:", "loss:", "optimizer:", "train:", "checkpoint:", "logging:"):
        assert section in text
    assert dump_yaml(again) in text


def test_from_dict_and_to_dict():
    cfg = from_dict({"optimizer": {"lr": 3}, "parallel": {"tp": 2}}, source="ckpt/config.yaml")
    assert cfg.optimizer.lr == 3.0 and cfg.parallel.tp == 2
    d = to_dict(cfg)
    assert d["optimizer"]["lr"] == 3.0 and d["logging"]["collapse"]["window"] == cfg.logging.collapse.window
    assert from_dict(d) == cfg
    d["loss"]["params"]["x"] = 1  # a deep copy
    assert cfg.loss.params == {}
    with pytest.raises(ValueError, match=r"ckpt/config.yaml: unknown key 'parallel.pp_size'"):
        from_dict({"parallel": {"pp_size": 2}}, source="ckpt/config.yaml")
    assert dataclasses.is_dataclass(cfg)


def test_docs_reference_lists_every_schema_field():
    """docs/training.md's configuration reference stays in sync with the schema."""
    from redi_megatron.config.loader import _all_paths

    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")
    text = open(docs, encoding="utf-8").read()
    leaves = [p for p in _all_paths() if not any(q.startswith(p + ".") for q in _all_paths())]
    missing = [p for p in leaves if f"| `{p}` |" not in text]
    assert not missing, f"docs/training.md has no reference row for {missing}"


def test_type_rules_for_annotations_the_schema_may_grow():
    """Literal, list and tuple fields are checked too (none in the schema yet)."""
    from typing import Literal, Optional

    from redi_megatron.config.loader import _check

    assert _check([1, 2], list[int], "x", "f") == [1, 2]
    assert _check([1, 2], tuple[int, ...], "x", "f") == (1, 2)
    assert _check([1, "a"], tuple[int, str], "x", "f") == (1, "a")
    assert _check("full", Optional[Literal["full", "selective"]], "x", "f") == "full"
    for value, tp, needle in ([1, "a"], list[int], "'x[1]' must be int"), ((1,), tuple[int, str], "2 items"), \
            ("half", Literal["full"], "must be one of ['full']"), (3, list[int], "must be a list"):
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            _check(value, tp, "x", "f")
