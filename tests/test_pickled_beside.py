"""Issue 24: a crafted ``pytorch_model.bin`` (a pickle that runs code when loaded) beside the safetensors of an
HF model directory is never unpickled: the loaders read safetensors only (``use_safetensors=True``, vLLM's
``load_format="safetensors"``), and redi-eval refuses in one line a directory where the pickle is all
transformers would find (safetensors neither ``model.safetensors`` nor indexed)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["REDI_TEST_MARKER"],))


@pytest.fixture
def hf_with_pickle(tmp_path, monkeypatch):
    """(HF dir: a tiny Qwen2 in model.safetensors, its tokenizer, a crafted pytorch_model.bin; the marker path
    the pickle would create)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from redi_megatron.data.synthetic import tiny_tokenizer

    d = tmp_path / "hf"
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(cfg).save_pretrained(str(d))
    tiny_tokenizer(vocab_size=300).save_pretrained(str(d))
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("REDI_TEST_MARKER", str(marker))
    torch.save({"model.embed_tokens.weight": _Payload()}, d / "pytorch_model.bin")
    return d, marker


def test_the_hf_backend_loads_the_safetensors_never_the_pickle(hf_with_pickle):
    from redi_megatron.eval.backends import HFBackend, SamplingConfig

    d, marker = hf_with_pickle
    backend = HFBackend(str(d), SamplingConfig(), dtype="float32", progress=False)
    assert backend.model.config.vocab_size == 300 and not marker.exists()


def test_hf_loads_of_model_weights_ask_for_safetensors_only():
    """Every place that loads HF model weights with transformers or vLLM names the safe format."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent / "redi_megatron"
    for rel in ("eval/backends.py", "convert/verify_parity.py", "convert/vllm_parity.py"):
        text = (root / rel).read_text()
        calls = 0
        for m in re.finditer(r"AutoModelForCausalLM\.from_pretrained\(|vllm\.LLM\(", text):
            call, calls = text[m.start():m.start() + 400].split("\n\n")[0], calls + 1
            wants = "use_safetensors=True" if "from_pretrained" in call else 'load_format="safetensors"'
            assert wants in call, (rel, call)
        assert calls, rel


def test_eval_refuses_a_dir_where_only_the_pickle_would_load(hf_with_pickle, tmp_path, capsys):
    from redi_megatron.eval.cli import main

    d, marker = hf_with_pickle
    shutil.move(d / "model.safetensors", d / "weights-00001-of-00001.safetensors")  # neither named nor indexed
    out = tmp_path / "evalout"
    with pytest.raises(SystemExit) as e:
        main(["--model", str(d), "--out", str(out), "--backend", "hf"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert "pytorch_model.bin" in err and "weights-00001-of-00001.safetensors" in err, err
    assert not out.exists() and not marker.exists()


def test_hf_to_megatron_ignores_the_pickle(hf_with_pickle, tmp_path):
    from redi_megatron.convert.hf_to_megatron import main

    d, marker = hf_with_pickle
    assert main(["--hf", str(d), "--out", str(tmp_path / "mc"), "--no-progress"]) == 0
    assert (tmp_path / "mc" / "model_config.json").is_file() and not marker.exists()
