"""The whole pipeline in ``redi-demo --quick`` (the README's first command, CI-sized): every stage's
outputs are there and pass their checks, SFT beats the random base model on held-out problems, and the
premise and per-path figures are written."""
import json
import os

import pytest

from redi_megatron.demo import cli, runner
from redi_megatron.demo.config import quick_config
from redi_megatron.demo.runner import Context
from redi_megatron.demo.stages import build_stages


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_demo_end_to_end(tmp_path, capsys):
    cfg = quick_config()
    stages = build_stages(cfg)
    missing = runner.missing_tools(stages)
    if missing:
        pytest.skip(f"pipeline tools not installed: {sorted(missing)}")
    out = str(tmp_path / "demo")
    assert cli.main(["--out", out, "--quick", "--quiet"]) == 0
    ctx = Context(out=out, cfg=cfg, echo=False)
    for stage in stages:
        assert stage.check(ctx) == [], stage.name
    state = runner.load_state(out)
    assert set(state["stages"]) == {s.name for s in stages}
    results = json.load(open(os.path.join(out, "results.json")))
    models = results["models"]
    assert models["base"]["pass@1"] == 0.0  # a random model never writes a correct \boxed{} answer
    sft_vs_base = results["differences"]["sft-base"]
    assert sft_vs_base["diff"] > 2 * sft_vs_base["se"]
    assert os.path.exists(os.path.join(out, "plots", "sft", "loss.png"))
    # the shortcut teacher's habit is copied, and the premise was measured before stage 2 on every pair
    assert results["paths"]["sft"]["shortcut_rate"] > 0.1 and "token_sft" in models
    premise = json.load(open(os.path.join(out, "premise.json")))
    assert premise["pairs"] + premise["identical"] == sum(1 for _ in open(os.path.join(out, "chosen", "chosen.jsonl")))
    assert 0.0 < premise["sampleable"] <= 1.0 and results["premise"]["redi"]["pairs"] == premise["pairs"]
    capsys.readouterr()
    # a rerun finds everything done and changes nothing
    assert cli.main(["--out", out, "--quick", "--quiet"]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == len(stages)
