"""Process-group set-up: torch.distributed + Megatron's parallel_state, on gloo (CPU) or NCCL (GPU).

Everything else in ``redi_megatron.parallel`` takes its groups as arguments; ``groups()`` is the one
place that reads them back from Megatron's global state, as an explicit :class:`ParallelGroups`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from redi_megatron.compat import cpu as cpu_compat

# megatron-core 0.16's tensor-parallel layers and DDP call torch.distributed.all_gather_into_tensor and
# reduce_scatter_tensor, which torch 2.13 renamed (*_single, same arguments) with a FutureWarning at each call
# site; our own code uses the new names (parallel/context.py). Only these two messages are hidden.
for _old in ("all_gather_into_tensor", "reduce_scatter_tensor"):
    warnings.filterwarnings("ignore", message=f"`torch.distributed.{_old}` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class ParallelGroups:
    """Explicit process groups for one rank; a group of size 1 is kept (functions treat it as no-op)."""

    tp: Optional[dist.ProcessGroup]
    pp: Optional[dist.ProcessGroup]
    cp: Optional[dist.ProcessGroup]
    dp: Optional[dist.ProcessGroup]          # data parallel, without CP
    dp_cp: Optional[dist.ProcessGroup]       # data x context parallel (Megatron's gradient group)

    @staticmethod
    def size(group: Optional[dist.ProcessGroup]) -> int:
        return 1 if group is None else dist.get_world_size(group)

    @staticmethod
    def rank(group: Optional[dist.ProcessGroup]) -> int:
        return 0 if group is None else dist.get_rank(group)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a lone process or a local test group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vpp: Optional[int] = None, *,
                  rank: Optional[int] = None, world_size: Optional[int] = None, seed: int = 1234,
                  timeout_s: float = 600.0) -> ParallelGroups:
    """Initialise torch.distributed (env:// rendezvous) and Megatron's model-parallel groups.

    On a machine without CUDA this activates :mod:`redi_megatron.compat.cpu` and uses gloo.
    """
    on_gpu = cpu_compat.cuda_available()
    if not on_gpu:
        cpu_compat.activate()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    if not dist.is_initialized():
        init_method = None  # env:// (torchrun, Slurm, the test harness)
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise ValueError("MASTER_PORT is not set: launch multi-process runs with torchrun "
                                 "(or set MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE)")
            # A lone process (a converter, an in-process test): any free port, passed explicitly and
            # never written to os.environ, where every child process would inherit a port this process
            # may still hold (EADDRINUSE in a converter started later by the same parent).
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        # The distributed optimizer looks its gloo groups up (checkpointing), also on CPU.
        create_gloo_process_groups=True,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return groups()


def groups() -> ParallelGroups:
    """The current rank's groups, read from Megatron's parallel_state."""
    from megatron.core import parallel_state as ps

    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
        cp=ps.get_context_parallel_group(), dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default group (explicitly: avoids aborts at exit)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    _drop_leftover_groups(ps)
    if dist.is_initialized():
        dist.destroy_process_group()


def _group_globals(ps) -> list[str]:
    """Names of Megatron ``parallel_state`` globals that hold a process group (alone, in a list or dict)."""
    names = []
    for name, value in vars(ps).items():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        if name.startswith("_") and any(isinstance(v, dist.ProcessGroup) for v in items):
            names.append(name)
    return names


def live_groups() -> list[str]:
    """What this process holds of torch.distributed: ``"default"`` when the default group is initialised,
    and the names of Megatron ``parallel_state`` globals that hold a process group. A process that forks
    ranks must hold none (a forked ``ProcessGroupGloo`` hangs in its destructor)."""
    from megatron.core import parallel_state as ps

    return (["default"] if dist.is_initialized() else []) + _group_globals(ps)


def _drop_leftover_groups(ps) -> None:
    """Set to None every ``parallel_state`` global that still holds a process group after
    ``destroy_model_parallel``.

    megatron-core 0.16's ``destroy_model_parallel`` forgets ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP``
    and its ``_GLOO`` twin. A process that forks after that (the test harness's ranks) inherits a
    ``ProcessGroupGloo`` whose worker threads do not exist in the child; when the child's
    ``initialize_model_parallel`` overwrites the global, the destructor joins those threads and hangs
    forever (the order-dependent hangs of the full suite). Dropped here, the destructor runs in the
    process that owns the threads."""
    for name in _group_globals(ps):
        setattr(ps, name, None)
