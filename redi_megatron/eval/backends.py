"""Generation backends: vLLM (GPU) and HF transformers ``generate`` (CPU fallback, small models).

A backend turns :class:`Request` s (a rendered prompt plus a per-sample seed) into
:class:`Completion` s. Both sample with the same explicit settings (temperature, top-p, top-k off,
no repetition penalty) so that the model's ``generation_config.json`` cannot change the protocol.

Seeding: vLLM seeds every request separately, so a sample depends only on (seed, benchmark,
problem, sample index) and a resumed run regenerates exactly what an uninterrupted one would.
HF ``generate`` draws from the global torch RNG; each batch is seeded from its requests' seeds,
so a run is reproducible for the same batching but not sample-by-sample across resumes.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from tqdm import tqdm

from redi_megatron.errors import MissingDependency, UserError

SampleKey = tuple[str, str, int]  # (benchmark, problem id, sample index)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling protocol. ``top_k`` <= 0 disables top-k (rllm/vLLM use -1)."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_new_tokens: int = 30720


@dataclass(frozen=True)
class Request:
    key: SampleKey
    prompt: str
    seed: int


@dataclass(frozen=True)
class Completion:
    """``finish_reason``: "stop" (end-of-turn/EOS generated) or "length" (hit max_new_tokens)."""

    text: str
    num_tokens: int
    finish_reason: str


def sample_seed(base_seed: int, key: SampleKey) -> int:
    """A 31-bit seed that depends only on the run seed and the sample's identity."""
    digest = hashlib.sha256(f"{base_seed}|{key[0]}|{key[1]}|{key[2]}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def encode_prompts(tokenizer: Any, requests: Sequence[Request]) -> list[list[int]]:
    """Prompt token ids, encoded one way for every backend (no BOS/special tokens added: the rendered
    template already holds them), so HF and vLLM see the same prompt token for token."""
    return [list(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in requests]


def stop_token_ids(tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """EOS ids of a Qwen-style tokenizer: its eos plus ``<|im_end|>`` / ``<|endoftext|>`` if present."""
    ids = {int(i) for i in extra if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|endoftext|>"):
        if token in vocab:
            ids.add(int(vocab[token]))
    if not ids:
        raise UserError("the tokenizer has no EOS / <|im_end|> token; generation would never stop")
    return sorted(ids)


class HFBackend:
    """Batched sampling with ``transformers`` ``generate`` (left padding, KV cache).

    Args:
        model_path: HF model directory. tokenizer_path: defaults to ``model_path``.
        dtype: "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16" or "float16".
        batch_size: sequences per ``generate`` call.
    """

    name = "hf"

    def __init__(self, model_path: str, sampling: SamplingConfig, tokenizer_path: Optional[str] = None,
                 dtype: str = "auto", batch_size: int = 8, progress: bool = True) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.sampling = sampling
        self.batch_size = batch_size
        self.progress = progress
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        self.tokenizer.padding_side = "left"
        # safetensors only: a pickled pytorch_model.bin beside them (which can run code) is never read
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), use_safetensors=True)
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise UserError(f"{model_path}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}): the model "
                            "diverged; evaluate an earlier checkpoint")
        self.model.to(self.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, [self.model.generation_config.eos_token_id]
                                       if isinstance(self.model.generation_config.eos_token_id, int) else [])
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.stop_ids[0]

    def _generation_config(self):
        from transformers import GenerationConfig

        s = self.sampling
        sample = s.temperature > 0
        # Every knob explicit: values left None would be filled from the model's generation_config.json.
        return GenerationConfig(
            do_sample=sample, temperature=s.temperature if sample else 1.0, top_p=s.top_p if sample else 1.0,
            top_k=max(s.top_k, 0) if sample else 0, repetition_penalty=1.0, min_p=0.0,
            max_new_tokens=s.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
        )

    def _completion(self, ids: list[int]) -> Completion:
        stop = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        kept = ids if stop is None else ids[:stop]
        text = self.tokenizer.decode(kept, skip_special_tokens=False)
        return Completion(text, len(kept) + (0 if stop is None else 1), "length" if stop is None else "stop")

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Completions in request order. Batches are formed from prompts of similar length."""
        torch = self.torch
        encoded = encode_prompts(self.tokenizer, requests)
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        out: list[Optional[Completion]] = [None] * len(requests)
        gen_config = self._generation_config()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="generating (hf)", disable=not self.progress):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            torch.manual_seed(sample_seed(sum(requests[i].seed for i in batch), ("hf-batch", "", len(batch))))
            with torch.no_grad():
                generated = self.model.generate(input_ids=input_ids.to(self.device),
                                                attention_mask=mask.to(self.device), generation_config=gen_config)
            for row, i in enumerate(batch):
                out[i] = self._completion(generated[row, width:].tolist())
        assert all(c is not None for c in out)
        return out  # type: ignore[return-value]


class VLLMBackend:
    """vLLM offline inference: tensor parallel inside, one engine per process.

    Data parallelism is handled above this class (one process per GPU group, problems sharded),
    since ``LLM(data_parallel_size>1)`` is not supported in a single process.
    """

    name = "vllm"

    def __init__(self, model_path: str, sampling: SamplingConfig, tokenizer_path: Optional[str] = None,
                 dtype: str = "auto", tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: Optional[int] = None, seed: int = 0, progress: bool = True,
                 enforce_eager: bool = False) -> None:
        vllm = import_vllm()
        self.sampling = sampling
        self.progress = progress
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path, tokenizer=tokenizer_path or model_path, dtype=dtype, seed=seed,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, enable_prefix_caching=True, enforce_eager=enforce_eager,
            load_format="safetensors",  # never a pickled .bin beside them
        )
        tokenizer = self.llm.get_tokenizer()
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.stop_texts = tuple(t for t in tokenizer.convert_ids_to_tokens(self.stop_ids) if t)

    def _params(self, seed: int):
        s = self.sampling
        return self._vllm.SamplingParams(
            n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
            repetition_penalty=1.0, min_p=0.0, max_tokens=s.max_new_tokens, seed=seed,
            stop_token_ids=self.stop_ids, skip_special_tokens=False,
        )

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Completions in request order; every request carries its own seed."""
        # Token ids, not strings: vLLM's own encoding would add special tokens where HF's does not.
        prompts = [{"prompt_token_ids": ids} for ids in encode_prompts(self.tokenizer, requests)]
        outputs = self.llm.generate(prompts, [self._params(r.seed) for r in requests], use_tqdm=self.progress)
        result = []
        for out in outputs:
            best = out.outputs[0]
            reason = "length" if best.finish_reason == "length" else "stop"
            text = best.text
            # Special tokens are kept (a model may mark </think> special) but not the final stop token.
            for stop in self.stop_texts:
                if text.endswith(stop):
                    text = text[: -len(stop)]
                    break
            result.append(Completion(text, len(best.token_ids), reason))
        return result


def import_vllm():
    """``import vllm`` with an actionable error when it is missing."""
    try:
        import vllm
    except ImportError as exc:
        raise MissingDependency(
            "the vLLM backend needs vllm, which is not installed: pip install 'redi-megatron[eval]' "
            "(or pip install vllm in your GPU container); use --backend hf for the transformers fallback"
        ) from exc
    return vllm


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
