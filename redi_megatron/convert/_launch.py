"""Process set-up shared by the checkpoint CLIs."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from redi_megatron.errors import UserError


def force_cpu() -> None:
    """Conversion is host-memory work: hide GPUs before anything initialises CUDA (gloo, CPU spec).

    Also on GPU nodes: the model then never has to fit a GPU, and the layout is the local spec the
    tests cover (its checkpoints load into the Transformer Engine spec as well).
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@contextmanager
def parallel_context(tp: int = 1, pp: int = 1) -> Iterator[None]:
    """Megatron parallel state for a CLI run.

    Reuses one that is already initialised (a caller's, or a test's ranks); otherwise initialises a
    single process, or the ``torchrun`` world when ``WORLD_SIZE == tp * pp``, and tears it down after.
    """
    from megatron.core import parallel_state as ps

    from redi_megatron.parallel.state import destroy_parallel, init_parallel

    if ps.model_parallel_is_initialized():
        yield
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        init_parallel(1, 1)
    elif world == tp * pp:
        init_parallel(tp, pp)
    else:
        raise UserError(f"launched with WORLD_SIZE={world}; run as one process, or with "
                         f"tp*pp = {tp * pp} processes")
    try:
        yield
    finally:
        destroy_parallel()


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body; user errors (``UserError``) become one line on stderr and exit status 2, anything
    else (a bug) keeps its traceback."""
    try:
        return body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
