"""The multi-rank harness and the CPU redirects behave as documented."""
from __future__ import annotations

import tempfile
import time

import pytest
import torch

from redi_megatron.compat import cpu as cpu_compat
from redi_megatron.testing.distributed import RankFailed, run_distributed


def _rank_info():
    import torch.distributed as dist

    from redi_megatron.parallel.state import groups

    g = groups()
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=g.tp)
    return dist.get_rank(), t.item(), g.size(g.tp), g.size(g.cp), g.size(g.dp)


def test_results_come_back_in_rank_order_with_layout():
    out = run_distributed(_rank_info, 4, tp=2, cp=2)
    assert [o[0] for o in out] == [0, 1, 2, 3]
    assert [o[1] for o in out] == [1.0, 1.0, 5.0, 5.0]  # TP groups are adjacent ranks
    assert all(o[2:] == (2, 2, 1) for o in out)


def _fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one is broken")
    dist.barrier()


def test_failing_rank_traceback_is_raised():
    with pytest.raises(RankFailed, match="rank one is broken"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def _hang():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        time.sleep(60)
    dist.barrier()


def test_hung_collective_times_out_with_stacks(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(RankFailed, match="did not finish") as err:
        run_distributed(_hang, 2, timeout=3)
    assert time.monotonic() - start < 30
    assert "_hang" in str(err.value)  # the stuck rank's stack names where it was
    assert not list(tmp_path.glob("redi_ranks_*"))  # the stack files are not left behind


def test_bad_layout_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        run_distributed(_rank_info, 2, tp=4)
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_rank_info, 3)


def _own_cuda_call_fails():
    assert cpu_compat.is_active()
    try:
        torch.cuda.current_device()
    except Exception as e:  # our code asking for CUDA must not be silently redirected
        return type(e).__name__
    return "no error"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_redirects_apply_to_megatron_only():
    assert run_distributed(_own_cuda_call_fails, 1)[0] != "no error"


def _distributed_optimizer_vs_adam():
    """Megatron's distributed optimizer accepts CPU params and matches torch Adam bitwise."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from redi_megatron.models.builder import build_gpt_model
    from redi_megatron.models.config import ModelConfig, ParallelConfig

    torch.manual_seed(0)
    model = build_gpt_model(ModelConfig(num_layers=1), ParallelConfig())
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0,
                                                 use_distributed_optimizer=True, clip_grad=0.0), [ddp])
    ids = torch.randint(0, 256, (2, 8))
    ddp.zero_grad_buffer()
    opt.zero_grad()
    model(ids, torch.arange(8).expand(2, 8), None).float().pow(2).mean().backward()
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    ref_params = [torch.nn.Parameter(reference[n]) for n, _ in model.named_parameters()]
    for p, (n, _) in zip(ref_params, model.named_parameters()):
        p.grad = grads[n]
    adam = torch.optim.Adam(ref_params, lr=1e-2)
    adam.step()
    return max((p.detach() - q.detach()).abs().max().item()
               for p, (_, q) in zip(ref_params, model.named_parameters()))


def test_distributed_optimizer_runs_on_cpu_and_matches_adam():
    assert run_distributed(_distributed_optimizer_vs_adam, 1)[0] < 1e-7


def test_a_lone_process_leaves_no_port_for_its_children(monkeypatch):
    """A single-process init (a converter, an in-process test) picks its own port without exporting it:
    a child started while the parent holds its group (the README chain's converter after in-process
    tests) must not inherit MASTER_PORT and fail with EADDRINUSE. Values of the child's all-reduce too."""
    import os
    import subprocess
    import sys

    from redi_megatron.parallel.state import destroy_parallel, init_parallel

    for var in ("MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    init_parallel(1, 1)
    try:
        assert "MASTER_PORT" not in os.environ
        child = ("import torch, torch.distributed as dist\n"
                 "from redi_megatron.parallel.state import init_parallel, destroy_parallel\n"
                 "init_parallel(1, 1); t = torch.tensor([3.0]); dist.all_reduce(t); print(t.item())\n"
                 "destroy_parallel()\n")
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip().endswith("3.0"), out.stderr[-2000:]
    finally:
        destroy_parallel()


def _dp_all_reduce():
    import torch.distributed as dist

    from redi_megatron.parallel.state import groups

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t, group=groups().dp)
    return t.item()


def test_ranks_forked_after_an_in_process_run_do_not_hang(monkeypatch):
    """An in-process init + destroy (a converter's main() in a test) leaves no process group behind:
    megatron-core 0.16 forgot two globals, and ranks forked later hung forever in the inherited
    ProcessGroupGloo's destructor (the full suite's order-dependent hangs of test_recipes). A parent
    that still holds a group is refused before forking, with the names."""
    from redi_megatron.parallel.state import destroy_parallel, init_parallel, live_groups

    for var in ("MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    init_parallel(1, 1)
    try:
        held = live_groups()
        assert "default" in held and "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO" in held
        with pytest.raises(RuntimeError, match="still holds process groups .*default"):
            run_distributed(_dp_all_reduce, 2)
    finally:
        destroy_parallel()
    assert live_groups() == []
    assert run_distributed(_dp_all_reduce, 2, timeout=90) == [3.0, 3.0]
