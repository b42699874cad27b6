"""Tiny SFT then REDI (examples/configs/tiny_cpu_*.yaml) on synthetic data; prints the per-step losses as JSON.

Run on the host and inside the built image (.ci/image/run.sh); the two outputs must agree.
Usage: python tiny_chain.py WORK_DIR CONFIG_DIR   (WORK_DIR is created; prints {"sft": [...], "redi": [...]})
"""
import json
import os
import sys

from redi_megatron.data.curate import CurationConfig, curate
from redi_megatron.data.synthetic import raw_rows, tiny_tokenizer, write_jsonl
from redi_megatron.training.cli import main as train
from redi_megatron.training.logging import read_metrics


def make_data(root: str) -> None:
    """Tokenizer + curated positives/pairs, as tests/conftest.py's tiny_train_data."""
    tok = tiny_tokenizer(vocab_size=300)
    tok.save_pretrained(os.path.join(root, "tokenizer"))
    rows, _ = raw_rows(0)
    write_jsonl(rows, os.path.join(root, "raw.jsonl"))
    curate(CurationConfig(input=os.path.join(root, "raw.jsonl"), output=os.path.join(root, "curated"), tokenizer="",
                          num_proc=1, progress=False, output_format="jsonl", max_prompt_tokens=128,
                          max_completion_tokens=384, length_filter="both"), tokenizer=tok)


def main(work: str, configs: str) -> None:
    os.makedirs(work, exist_ok=False)
    make_data(work)
    losses = {}
    for stage, data, init in (("sft", "positives.jsonl", None), ("redi", "pairs.jsonl", "sft")):
        args = ["--config", os.path.join(configs, f"tiny_cpu_{stage}.yaml"),
                f"data.train_path={work}/curated/{data}", f"data.tokenizer={work}/tokenizer",
                f"checkpoint.save_dir={work}/{stage}", "train.max_steps=4", "logging.collapse.action=warn"]
        if init:
            args.append(f"checkpoint.init_from={work}/{init}")
        rc = train(args)
        if rc:
            sys.exit(f"tiny_chain: {stage} exited {rc}")
        losses[stage] = [r["loss"] for r in read_metrics(os.path.join(work, stage, "metrics.jsonl"))]
        print(f"tiny_chain: {stage} losses {losses[stage]}", file=sys.stderr)  # kept when a later stage fails
    print(json.dumps(losses))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
