"""Every shipped recipe loads and is consistent; the paper recipes carry the paper's numbers."""
import glob
import os

import pytest

from redi_megatron.config import load_config
from redi_megatron.losses import get_loss

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")
ALL = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
RECIPES = [p for p in ALL if os.path.dirname(p) == CONFIGS]  # runnable recipes (models/ are fragments)


def load(name):
    return load_config(os.path.join(CONFIGS, name))


def test_recipes_present():
    names = {os.path.basename(p) for p in RECIPES}
    for n in ("qwen2.5-math-1.5b_sft.yaml", "qwen2.5-math-1.5b_redi.yaml", "qwen2.5-math-1.5b_dpo.yaml",
              "qwen2.5-math-1.5b_simpo.yaml", "qwen2.5-math-7b_sft_4node.yaml", "tiny_cpu_sft.yaml",
              "tiny_cpu_redi.yaml"):
        assert n in names


@pytest.mark.parametrize("path", ALL, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_every_yaml_loads_and_validates(path):
    cfg = load_config(path)
    p = cfg.parallel
    p.validate(p.tp * p.pp * p.cp, cfg.model)      # TP divides heads/groups/FFN, PP divides layers
    spec = get_loss(cfg.loss.name)
    spec.make_hparams(cfg.loss.params)              # known loss, known and valid hyper-parameters
    d = cfg.data
    assert d.micro_batch_tokens % p.seq_multiple() == 0
    longest = d.max_prompt_tokens + d.max_completion_tokens
    assert longest <= d.micro_batch_tokens, "a sequence within the length limits must fit one row"
    assert longest <= cfg.model.max_position_embeddings
    if spec.normalizer == "pairs" or cfg.loss.name == "redi":
        # the sampler keeps a pair's two sequences in one microbatch
        assert 2 * longest <= d.micro_batch_tokens
    assert cfg.checkpoint.save_dir and cfg.name


def qwen15_arch(m):
    return (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
            m.vocab_size, m.add_qkv_bias, m.tie_word_embeddings)


def test_paper_sft_recipe():
    c = load("qwen2.5-math-1.5b_sft.yaml")
    assert qwen15_arch(c.model) == (28, 1536, 8960, 12, 2, 151936, True, True)
    # the REDI authors' long-context edit of the HF config
    assert (c.model.rope_theta, c.model.max_position_embeddings) == (300000.0, 32768)
    assert c.loss.name == "sft"
    assert (c.optimizer.lr, c.train.epochs, c.data.global_batch_size, c.optimizer.warmup_ratio) == (5e-5, 5, 128, 0.1)
    assert c.data.micro_batch_tokens == 32768 and c.optimizer.decay == "linear" and c.train.dtype == "bf16"
    assert c.parallel.tp * c.parallel.pp * c.parallel.cp == 1  # 8 GPUs = DP 8 on one node


def test_paper_redi_recipe():
    c, sft = load("qwen2.5-math-1.5b_redi.yaml"), load("qwen2.5-math-1.5b_sft.yaml")
    assert c.model == sft.model
    assert c.loss.name == "redi" and c.loss.params["alpha"] == 0.8 and c.loss.params.get("chosen_coef", 1.0) == 1.0
    assert (c.optimizer.lr, c.data.global_batch_size, c.train.epochs) == (1e-6, 32, 1)
    assert (c.data.max_prompt_tokens, c.data.max_completion_tokens) == (800, 19000)
    assert c.checkpoint.init_from == sft.checkpoint.save_dir  # stage 2 starts from stage 1


@pytest.mark.parametrize("name, loss, params, lr", [
    ("qwen2.5-math-1.5b_dpo.yaml", "dpo", {"beta": 0.001}, 2e-7),
    ("qwen2.5-math-1.5b_simpo.yaml", "simpo", {"beta": 2.0, "gamma": 1.0}, 5e-7),
])
def test_paper_baselines(name, loss, params, lr):
    c, redi = load(name), load("qwen2.5-math-1.5b_redi.yaml")
    assert c.loss.name == loss and c.loss.params == params and c.optimizer.lr == lr
    # same setup as REDI apart from the objective
    assert c.data == redi.data and c.train == redi.train and c.model == redi.model
    assert c.checkpoint.init_from == redi.checkpoint.init_from
    assert c.checkpoint.save_dir != redi.checkpoint.save_dir


def test_7b_multinode_recipe():
    c = load("qwen2.5-math-7b_sft_4node.yaml")
    m = c.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
            m.vocab_size, m.tie_word_embeddings) == (28, 3584, 18944, 28, 4, 152064, False)
    world = 4 * 8
    c.parallel.validate(world, m)
    assert c.parallel.tp * c.parallel.cp * c.parallel.pp == 8  # model parallelism inside one node
    assert c.parallel.sequence_parallel
    redi = load("qwen2.5-math-7b_redi_4node.yaml")
    assert redi.checkpoint.init_from == c.checkpoint.save_dir and redi.loss.params["alpha"] == 0.8


def test_tiny_cpu_recipes():
    sft, redi = load("tiny_cpu_sft.yaml"), load("tiny_cpu_redi.yaml")
    for c in (sft, redi):
        assert c.train.dtype == "fp32" and c.train.fp8 is None
        assert c.data.micro_batch_tokens == (1024 if c is redi else 512)  # a pair shares one packed row
        m = c.model
        layer = (m.hidden_size * m.head_dim * (m.num_attention_heads + 2 * m.num_query_groups)  # qkv
                 + m.num_attention_heads * m.head_dim * m.hidden_size                           # proj
                 + 3 * m.hidden_size * m.ffn_hidden_size)                                       # swiglu
        params = m.padded_vocab_size() * m.hidden_size * (1 if m.tie_word_embeddings else 2) + m.num_layers * layer
        assert params * 4 < 5e6, "a few-MB model"
    assert redi.model == sft.model and redi.checkpoint.init_from == sft.checkpoint.save_dir
    assert redi.loss.name == "redi" and sft.loss.name == "sft"


# ----------------------------------------------------------------------------- examples/slurm

SLURM = os.path.join(os.path.dirname(CONFIGS), "slurm")


def _bash(args, env, cwd):
    import subprocess

    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(["bash", *args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_pipeline_submits_the_chain_with_afterok(tmp_path):
    repo = os.path.dirname(os.path.dirname(CONFIGS))
    r = _bash([os.path.join(SLURM, "pipeline.sh")],
              {"DRY_RUN": "1", "HF_BASE": "/models/Qwen2.5-Math-1.5B", "EVAL_IMAGE": "/img/vllm.sqsh"}, repo)
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stderr.splitlines() if line.startswith("sbatch")]
    names = [c.split("--job-name=")[1].split()[0] for c in cmds]
    assert names == ["redi-convert", "redi-sft", "redi-redi", "redi-export-sft", "redi-export", "redi-eval"]
    deps = [c.split("--dependency=")[1].split()[0] if "--dependency=" in c else None for c in cmds]
    # the eval also waits for the SFT export (its job id was dropped before)
    assert deps == [None, r"afterok:\<convert\>", r"afterok:\<sft\>", r"afterok:\<sft\>", r"afterok:\<redi\>",
                    r"afterok:\<export\>:\<export-sft\>"]
    assert all("--kill-on-invalid-dep=yes" in c for c in cmds[1:])  # a failed stage cancels its dependants
    assert "rope_theta=300000" in cmds[0] and "max_position_embeddings=32768" in cmds[0]
    assert "qwen2.5-math-1.5b_sft.yaml" in cmds[1] and "checkpoint.init_from=checkpoints/qwen2.5-math-1.5b" in cmds[1]
    assert "INIT_FROM_RUN=runs/qwen2.5-math-1.5b_sft" in cmds[2] and "qwen2.5-math-1.5b_redi.yaml" in cmds[2]
    assert "IMAGE=/img/vllm.sqsh" in cmds[5]
    for c in cmds[1:3]:  # the configs the pipeline trains exist
        cfg = next(tok for tok in c.split() if tok.endswith(".yaml"))
        assert os.path.isfile(os.path.join(repo, cfg))


@pytest.mark.parametrize("env, needle", [
    ({"START_AT": "bogus"}, "START_AT must be one of"),
    ({"START_AT": "redi", "STOP_AT": "sft"}, "comes before"),
    ({"HF_BASE": "/m"}, "set EVAL_IMAGE"),
    ({"STOP_AT": "export"}, "set HF_BASE"),
])
def test_pipeline_refuses_bad_settings(tmp_path, env, needle):
    r = _bash([os.path.join(SLURM, "pipeline.sh")], {"DRY_RUN": "1", **env}, str(tmp_path))
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_torchrun_node_builds_the_launch_and_resolves_init_from_run(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (fake / "torchrun").chmod(0o755)
    ckpts = tmp_path / "runs" / "sft" / "checkpoints"
    for name, complete in (("step_0000010", True), ("step_0000020", True), ("step_0000030", False)):
        (ckpts / name).mkdir(parents=True)
        if complete:
            (ckpts / name / "redi_meta.json").write_text("{}")
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NNODES": "4", "SLURM_NODEID": "2",
           "SLURM_JOB_ID": "77", "MASTER_ADDR": "node0", "MASTER_PORT": "20077",
           "INIT_FROM_RUN": str(tmp_path / "runs" / "sft")}
    r = _bash([os.path.join(SLURM, "torchrun_node.sh"), "cfg.yaml", "a=1", "b=x y"], env, str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert not any(a.startswith("--node-rank") for a in r.stdout.splitlines())  # c10d ignores it (warning)
    assert r.stdout.splitlines() == [
        "--nnodes=4", "--nproc-per-node=8", "--rdzv-id=77", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:20077", "-m", "redi_megatron.training.cli", "--config", "cfg.yaml", "a=1", "b=x y",
        f"checkpoint.init_from={ckpts / 'step_0000020'}"]  # the newest *complete* checkpoint
    env["INIT_FROM_RUN"] = str(tmp_path / "nothing")
    r = _bash([os.path.join(SLURM, "torchrun_node.sh"), "cfg.yaml"], env, str(tmp_path))
    assert r.returncode != 0 and "no complete checkpoint" in r.stderr


def _shrunk(path: str, data: dict, save_dir: str):
    """``path``'s recipe with only the model and the data made tiny: its parallel layout (TP/PP/CP/VPP/SP),
    packing, loss and hyper-parameters, optimizer, dtype and recompute stay. DP shrinks to what the
    8 forked ranks allow (a recipe's DP is only its world size divided by TP*PP*CP)."""
    import dataclasses

    cfg = load_config(path)
    p = cfg.parallel
    heads = 4 * p.tp                           # TP divides the heads and the KV groups
    cfg.model = dataclasses.replace(
        cfg.model, num_layers=2 * p.pp * (p.vpp or 1), hidden_size=16 * heads, ffn_hidden_size=128,
        num_attention_heads=heads, num_query_groups=2 * p.tp, kv_channels=16, vocab_size=320,
        max_position_embeddings=1024)
    pairs = get_loss(cfg.loss.name).normalizer == "pairs"
    longest = 200 + 400                        # the tiny data's prompt and completion limits
    multiple = p.seq_multiple()
    budget = (2 * longest if pairs else longest) + multiple * (2 if pairs else 1)
    cfg.data = dataclasses.replace(
        cfg.data, train_path=data["pairs" if pairs else "positives"], tokenizer=data["tokenizer"],
        global_batch_size=min(cfg.data.global_batch_size, 8), micro_batch_tokens=-(-budget // multiple) * multiple,
        max_prompt_tokens=200, max_completion_tokens=400)
    cfg.train = dataclasses.replace(cfg.train, max_steps=2)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, init_from=None, save_dir=save_dir, save_interval=0)
    cfg.logging = dataclasses.replace(cfg.logging, tensorboard=False, wandb_project=None)
    return cfg


def _train_two_steps(cfg):
    import math

    from redi_megatron.training.trainer import train

    out = train(cfg)
    assert out["last_step"] == 2 and all(math.isfinite(h["loss"]) for h in out["history"]), out["history"]
    return out["history"][-1]["loss"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p))
def test_every_recipe_runs_two_steps(path, tiny_train_data, tmp_path):
    """Each shipped recipe trains 2 steps on gloo ranks with its own layout: a recipe that cannot run
    (a refused batch layout, a schedule constraint, a loss/data mismatch) fails here."""
    from redi_megatron.testing.distributed import run_distributed

    cfg = _shrunk(path, tiny_train_data, str(tmp_path / "run"))
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    world = model_parallel * (2 if model_parallel <= 4 else 1)
    losses = run_distributed(_train_two_steps, world, tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp, args=(cfg,),
                             timeout=280)
    assert len(losses) == world


def _readme_chain() -> list[list[str]]:
    """The commands of README.md's "pipeline on real data" block, each as argv (continuations joined)."""
    import shlex

    readme = open(os.path.join(os.path.dirname(CONFIGS), "..", "README.md"), encoding="utf-8").read()
    block = readme.split("## The pipeline on real data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    text = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_readme_real_data_chain_is_consistent_with_the_recipes():
    """Every step of the README's chain reads what the previous step writes (issue 13's probe: the
    README curated into one directory while the recipes read another)."""
    cmds = {argv[0] if argv[0] != "torchrun" else os.path.basename(_flag(argv, "--config")): argv
            for argv in _readme_chain()}
    curated = _flag(cmds["redi-curate"], "--output")
    base = _flag(cmds["redi-hf-to-megatron"], "--out")
    sft, redi = load("qwen2.5-math-1.5b_sft.yaml"), load("qwen2.5-math-1.5b_redi.yaml")
    assert sft.data.train_path == os.path.join(curated, "positives")
    assert redi.data.train_path == os.path.join(curated, "pairs")
    assert sft.checkpoint.init_from == base
    assert redi.checkpoint.init_from == sft.checkpoint.save_dir
    assert _flag(cmds["redi-megatron-to-hf"], "--megatron") == redi.checkpoint.save_dir
    assert _flag(cmds["redi-eval"], "--model") == _flag(cmds["redi-megatron-to-hf"], "--out")
    assert _flag(cmds["redi-curate"], "--tokenizer") == _flag(cmds["redi-hf-to-megatron"], "--hf")


PAPER_DATA_RECIPES = [p for p in RECIPES if not os.path.basename(p).startswith("tiny_cpu")]  # tiny_cpu: demo data


@pytest.mark.parametrize("path", PAPER_DATA_RECIPES, ids=os.path.basename)
def test_recipe_accepts_what_curation_writes_by_default(path):
    """Lengths agree by construction (issue 21): redi-curate's defaults (the dataclass and the CLI) filter
    positives and pairs to limits that every recipe for curated OpenR1 data accepts."""
    from redi_megatron.data.curate import CurationConfig, config_from_args

    lib = CurationConfig(input="in", output="out", tokenizer="tok")
    cli = config_from_args(["--input", "in", "--output", "out", "--tokenizer", "tok"])
    for c in (lib, cli):
        assert c.length_filter == "both" and c.outputs == ("positives", "pairs")
        assert (c.max_prompt_tokens, c.max_completion_tokens) == (800, 19000)  # the paper's P800/R19000
    d = load_config(path).data
    assert d.max_prompt_tokens >= cli.max_prompt_tokens and d.max_completion_tokens >= cli.max_completion_tokens
