"""redi-verify-parity: run an HF model and a redi-megatron checkpoint on the same prompts and compare.

    redi-verify-parity --hf Qwen2.5-Math-1.5B --megatron ckpt/base
    redi-verify-parity --megatron ckpt/step_1000 --vllm        # three engines, see below

Prints, per prompt, the max absolute logit difference and the KL divergence KL(HF || Megatron) per
token (mean and max), and exits 1 when either exceeds its tolerance (0 otherwise, 2 on bad input).
Both models run in fp32 by default, each prompt alone (no padding, no attention mask: causal), with
explicit position ids. The Megatron model is the TP1/PP1 model the checkpoint reshards into. The HF
model gets the checkpoint's RoPE base, context length and norm epsilon (a conversion with
``--override rope_theta=...`` is compared under the same RoPE), so only the weights are compared.

With ``--vllm`` the checkpoint is exported (or ``--hf`` names its export, loaded as written, config.json
included) and three engines score the same token ids: the trainer's log-probs (Megatron), transformers
and vLLM (``prompt_logprobs``); it prints the max and mean |log-prob difference| of each pair and
compares HF's and vLLM's greedy continuations token by token; exit 1 past ``--max-logprob-diff`` or on a
greedy mismatch (see :mod:`redi_megatron.convert.vllm_parity`).
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m: parse the arguments before torch is imported (convert/cli.py)
    from redi_megatron.convert.cli import verify_parity

    raise SystemExit(verify_parity())

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from redi_megatron.convert import vllm_parity
from redi_megatron.convert._launch import force_cpu, parallel_context, run_cli
from redi_megatron.convert.cli import verify_parity_parser
from redi_megatron.errors import UserError
from redi_megatron.models.checkpoint import TOKENIZER_SUBDIR, dtype_from_name, read_meta, tokenizer_files
from redi_megatron.models.config import ModelConfig

DEFAULT_PROMPTS = (
    "Find the sum of all positive integers n such that n^2 - 19n + 99 is a perfect square.",
    "Let x + 1/x = 3. Compute x^4 + 1/x^4. Please reason step by step, and put your final answer "
    "within \\boxed{}.",
    "The quick brown fox jumps over the lazy dog.",
)


@dataclass
class PromptReport:
    tokens: int
    max_abs_diff: float
    mean_kl: float
    max_kl: float


def compare_logits(hf_logits: torch.Tensor, mcore_logits: torch.Tensor) -> PromptReport:
    """``[S, V]`` each (Megatron's already stripped of vocabulary padding)."""
    hf, mc = hf_logits.double(), mcore_logits.double()
    log_p, log_q = torch.log_softmax(hf, -1), torch.log_softmax(mc, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # per token
    return PromptReport(tokens=hf.shape[0], max_abs_diff=(hf - mc).abs().max().item(),
                        mean_kl=kl.mean().item(), max_kl=kl.max().item())


def _prompt_ids(hf_dir: Path, ckpt: Path, prompts: Sequence[str], vocab_size: int) -> list[torch.Tensor]:
    """Token ids of the prompts with the HF directory's tokenizer (or the checkpoint's); random ids
    (seeded) when neither has one, e.g. for a randomly initialised test model."""
    for d in (hf_dir, ckpt / TOKENIZER_SUBDIR):
        if d.is_dir() and tokenizer_files(d):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(d))
            ids = [torch.tensor(tok(p)["input_ids"]) for p in prompts]
            too_big = [int(t.max()) for t in ids if int(t.max()) >= vocab_size]
            if too_big:
                raise UserError(f"tokenizer in {d} produces id {too_big[0]} >= vocab_size {vocab_size}")
            return ids
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (16 + 8 * i,), generator=g) for i in range(len(prompts))]


def _hf_config_like(hf_dir: Path, cfg: ModelConfig):
    """The HF config with the fields ``--override`` may have changed set as in the checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_dir))
    if isinstance(getattr(config, "rope_parameters", None), dict):  # transformers 5
        config.rope_parameters["rope_theta"] = cfg.rope_theta
    else:
        config.rope_theta = cfg.rope_theta
    config.max_position_embeddings = cfg.max_position_embeddings
    config.rms_norm_eps = cfg.norm_eps
    return config


@torch.no_grad()
def verify_parity(hf_dir: str | Path, ckpt_dir: str | Path, *, prompts: Sequence[str] = DEFAULT_PROMPTS,
                  dtype: str = "fp32") -> list[PromptReport]:
    """Per-prompt comparison. Needs a single-rank Megatron parallel state."""
    from transformers import AutoModelForCausalLM

    from redi_megatron.convert.megatron_to_hf import load_megatron_model

    hf_dir, ckpt = Path(hf_dir), Path(ckpt_dir)
    torch_dtype = dtype_from_name(dtype, "--dtype")
    mcore, cfg, _ = load_megatron_model(ckpt, dtype=torch_dtype)
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5.0
    config = _hf_config_like(hf_dir, cfg)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), config=config, use_safetensors=True,
                                              **{key: torch_dtype}).eval()
    if hf.config.vocab_size != cfg.vocab_size:
        raise UserError(f"{hf_dir}/config.json has vocab_size {hf.config.vocab_size}, the checkpoint "
                         f"{cfg.vocab_size}")
    reports = []
    for ids in _prompt_ids(hf_dir, ckpt, prompts, cfg.vocab_size):
        ids = ids[None]
        pos = torch.arange(ids.shape[1])[None]
        hf_logits = hf(ids, position_ids=pos).logits[0]
        mc_logits = mcore(ids, pos, None)[0, :, :cfg.vocab_size]
        reports.append(compare_logits(hf_logits.float(), mc_logits.float()))
    return reports


build_parser = verify_parity_parser  # the command line lives in convert/cli.py (parsed before torch is imported)


def _read_prompts(path: Optional[str]) -> Sequence[str]:
    if path is None:
        return DEFAULT_PROMPTS
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise UserError(f"{path} has no prompts (one per line)")
    return prompts


def three_engines(args: argparse.Namespace, prompts: Sequence[str], cuda_visible: Optional[str]) -> int:
    """``--vllm``: export (unless ``--hf`` names the export), score with the three engines, print, 0/1."""
    from redi_megatron.convert.megatron_to_hf import export_megatron_to_hf, load_megatron_model

    dtype = dtype_from_name(args.dtype, "--dtype")
    report = vllm_parity.ThreeWayReport()
    with tempfile.TemporaryDirectory(prefix="redi-parity-") as tmp:
        with parallel_context():
            hf_dir = Path(args.hf) if args.hf else export_megatron_to_hf(args.megatron, Path(tmp) / "hf",
                                                                          progress=False)
            model, cfg, _ = load_megatron_model(args.megatron, dtype=dtype)
            sequences = _prompt_ids(hf_dir, Path(args.megatron), prompts, cfg.vocab_size)
            report.logprobs["megatron"] = vllm_parity.megatron_logprobs(model, cfg.vocab_size, sequences)
            del model
        report.logprobs["hf"], report.greedy["hf"] = vllm_parity.hf_logprobs_and_greedy(hf_dir, dtype, sequences,
                                                                                args.greedy_tokens)
        report.logprobs["vllm"], report.greedy["vllm"] = vllm_parity.vllm_logprobs_and_greedy(
            hf_dir, dtype, sequences, args.greedy_tokens, tensor_parallel_size=args.vllm_tp,
            cuda_visible_devices=cuda_visible)
    scored = sum(int(s.numel()) - 1 for s in sequences)
    print(f"{scored} tokens scored over {len(sequences)} sequences ({args.dtype}); export: "
          f"{args.hf or 'temporary'}")
    print(f"{'engines':<18} {'max|dlogp|':>11} {'mean|dlogp|':>12}")
    worst = 0.0
    for a, b in vllm_parity.PAIRS:
        mx, mean = report.diff(a, b)
        worst = max(worst, mx)
        print(f"{a + ' vs ' + b:<18} {mx:>11.3e} {mean:>12.3e}")
    mismatches = report.greedy_mismatches()
    for i, first in enumerate(mismatches):
        h, v = report.greedy["hf"][i], report.greedy["vllm"][i]
        print(f"greedy hf vs vllm, prompt {i}: " + (f"{len(h)}/{len(h)} tokens equal" if first is None else
              f"first differs at token {first} (hf {h[first:first + 1]}, vllm {v[first:first + 1]})"))
    differ = sum(m is not None for m in mismatches)
    ok = worst <= args.max_logprob_diff and differ == 0
    print(f"{'PASS' if ok else 'FAIL'}: max|dlogp| {worst:.3e} (tol {args.max_logprob_diff:g}); greedy "
          f"continuations differ in {differ} of {len(mismatches)} prompts")
    return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The tool's work, on parsed arguments (``convert.cli.verify_parity`` parses them first)."""
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # for vLLM's child process
    force_cpu()

    def body() -> int:
        prompts = _read_prompts(args.prompts)
        if args.vllm:
            vllm_parity.check_vllm_installed()  # before anything else
            read_meta(args.megatron)
            if args.hf is not None and not (Path(args.hf) / "config.json").is_file():
                raise UserError(f"{args.hf} has no config.json")
            if args.greedy_tokens < 0:
                raise UserError(f"--greedy-tokens must be >= 0, got {args.greedy_tokens}")
            return three_engines(args, prompts, cuda_visible)
        if args.hf is None:
            raise UserError("--hf is required (or --vllm to export --megatron and compare three engines)")
        read_meta(args.megatron)
        dtype_from_name(args.dtype, "--dtype")
        if not (Path(args.hf) / "config.json").is_file():
            raise UserError(f"{args.hf} has no config.json")
        with parallel_context():
            reports = verify_parity(args.hf, args.megatron, prompts=prompts, dtype=args.dtype)
        print(f"{'prompt':>6} {'tokens':>6} {'max|dlogit|':>12} {'mean KL':>10} {'max KL':>10}")
        for i, r in enumerate(reports):
            print(f"{i:>6} {r.tokens:>6} {r.max_abs_diff:>12.3e} {r.mean_kl:>10.3e} {r.max_kl:>10.3e}")
        worst_diff = max(r.max_abs_diff for r in reports)
        worst_kl = max(r.max_kl for r in reports)
        ok = worst_diff <= args.max_abs_diff and worst_kl <= args.max_kl
        print(f"{'PASS' if ok else 'FAIL'}: max|dlogit| {worst_diff:.3e} (tol {args.max_abs_diff:g}), "
              f"max KL {worst_kl:.3e} (tol {args.max_kl:g})")
        return 0 if ok else 1

    return run_cli("redi-verify-parity", body)

