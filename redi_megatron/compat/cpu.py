"""Run Megatron-Core on a CPU-only machine (gloo backend). The only place that knows about it.

Megatron-Core 0.16 assumes CUDA in a few dozen places that a CPU run reaches. ``activate()`` redirects
exactly those, and only when CUDA is absent: on a GPU it does nothing and Megatron runs untouched.

Redirects (each applies only to calls made *from megatron's own source files*, so a stray
``.cuda()`` or ``torch.cuda.*`` in our code still fails loudly):

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. Megatron passes it as ``device=``
   (RoPE's ``get_emb`` moves ``inv_freq`` with it; the global memory buffer allocates with it;
   dist_checkpointing's ``state_dict_saver`` uses it).
2. ``torch.cuda.synchronize()`` (dist_checkpointing's async writer), ``empty_cache`` and
   ``reset_peak_memory_stats`` are no-ops; memory queries return 0.
3. CUDA RNG: attention forks the model-parallel RNG tracker even with dropout 0, so
   ``model_parallel_cuda_manual_seed`` must work. ``torch.cuda.{get,set}_rng_state``/``manual_seed`` and
   the tracker's private ``_get_cuda_rng_state``/``_set_cuda_rng_state`` are routed to the CPU generator,
   which is what CPU dropout draws from anyway: runs stay deterministic for a seed.
4. A ``TorchFunctionMode`` rewrites CUDA device arguments of tensor factories (``torch.zeros(...,
   device="cuda")`` in the pipeline schedules, ``get_default_causal_mask``), ``Tensor.cuda()`` and
   ``Tensor.to("cuda")`` to the CPU, and drops ``pin_memory=True`` (raises on CPU-only torch).
5. ``Tensor.type()`` (no argument) reports ``torch.cuda.FloatTensor`` etc.: the distributed optimizer
   checks those strings (``optimizer/distrib_optimizer.py``) and refuses CPU params otherwise; with the
   check satisfied its results are bitwise those of plain Adam (see tests/test_cpu_compat.py).

6. Reloading the distributed optimizer (``fully_reshardable`` format) with torch's Adam (the fallback
   without apex/TE) fails: ``_set_main_param_and_optimizer_states`` copies every per-parameter state
   key, and torch Adam's ``step`` is stored separately (param groups). Worse, the load gives every
   parameter the *same* ``step`` tensor, which torch Adam then increments in place once per parameter,
   so bias correction goes wrong from the second step after a resume. The wrapper gives each
   parameter its own copy of the restored ``step`` and makes the copy Megatron attempts a no-op.

Not redirects, but CPU substitutes chosen by the layer spec (``redi_megatron.models.layer_specs``):
- local ``DotProductAttention`` refuses packed (THD) rows and context parallelism (TE-only), so the local
  spec uses ``redi_megatron.models.thd_attention.THDCoreAttention`` (per-sequence causal attention from
  ``PackedSeqParams``; under CP it all-gathers K/V and undoes the per-sequence 2*CP chunk order);
- Megatron's no-TE norm wrapper refuses sequence parallelism, so CPU uses ``torch.nn.RMSNorm`` with its
  weight tagged ``sequence_parallel`` so ``finalize_model_grads`` all-reduces its gradient.

Known silent trap handled elsewhere: virtual pipeline stages with ``batch_p2p_comm=True`` on gloo swap
messages when the previous and next stage are the same peer (PP=2); ``redi_megatron.models.builder``
refuses that combination (tests/test_parallel_parity.py pins the failure mode).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Megatron warns at import time, once per module, that TE/apex are missing; on CPU that is expected.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message)

_GRAD_GET = torch.Tensor.grad.__get__  # a new method-wrapper per access: compared with ==, not is
_NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"
_MEGATRON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(
    __import__("importlib.util").util.find_spec("megatron.core").origin)))
_ACTIVE = False
_FACTORIES_WITH_DEVICE = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.rand,
    torch.randn, torch.randint, torch.eye, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.as_tensor, torch.linspace, torch.empty_strided,
}
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def cuda_available() -> bool:
    """True when a real CUDA device can be used (then nothing here is activated)."""
    return torch.cuda.is_available()


def is_active() -> bool:
    return _ACTIVE


def _called_from_megatron(depth: int = 2) -> bool:
    """Whether the frame ``depth`` levels up belongs to megatron's source tree."""
    frame = sys._getframe(depth)
    return frame.f_code.co_filename.startswith(_MEGATRON_DIR)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device index means a CUDA ordinal in torch's API.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requested by megatron's code to the CPU (redirect 4 and 5)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES_WITH_DEVICE:
            if _is_cuda_device(kwargs.get("device")) and _called_from_megatron():
                kwargs = {**kwargs, "device": "cpu"}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
        elif func is torch.Tensor.cuda and _called_from_megatron():
            return args[0]
        elif func is torch.Tensor.to and _called_from_megatron():
            args, kwargs = _cpu_to_args(args, kwargs)
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs and _called_from_megatron():
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        elif func is torch.Tensor.pin_memory:
            return args[0]
        elif func == _GRAD_GET and not args[0].is_leaf and _called_from_megatron():
            # Megatron's distributed optimizer zeroes the grads of its fp32 shard *views* (its comment: "throws
            # grad-access warning"): reading an unset .grad of a non-leaf is None, which is what it wants. The
            # warning, raised here because this mode is on the stack, would name this file in every CPU run.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD)
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _cpu_to_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
    if _is_cuda_device(kwargs.get("device")):
        kwargs = {**kwargs, "device": "cpu"}
    return args, kwargs


def _megatron_only(name: str, replacement):
    """Wrap ``torch.cuda.<name>`` so megatron's calls get ``replacement`` and ours the original."""
    original = getattr(torch.cuda, name)

    def wrapper(*args, **kwargs):
        if _called_from_megatron():
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    wrapper.__wrapped__ = original
    wrapper.__name__ = name
    setattr(torch.cuda, name, wrapper)


def _cpu_set_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(state)


def _patch_optimizer_step_state() -> None:
    """Redirect 6: keep torch Adam's per-parameter ``step`` when reloading optimizer state."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                state["step"] = state["step"].detach().clone()  # de-alias (see redirect 6)
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def activate() -> bool:
    """Install the redirects if CUDA is absent. Idempotent. Returns whether they are active."""
    global _ACTIVE
    if _ACTIVE or cuda_available():
        return _ACTIVE
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # fusions would compile for 17 s on first call
    # Megatron recommends CUDA_DEVICE_MAX_CONNECTIONS=1 (one CUDA work queue, so its async grad all-reduce
    # overlaps in order) and warns on every TP run without it; on a CPU there are no CUDA queues to order.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _megatron_only("current_device", lambda: torch.device("cpu"))
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        _megatron_only(name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved"):
        _megatron_only(name, lambda *a, **k: 0)
    _megatron_only("get_rng_state", lambda *a, **k: torch.get_rng_state())
    _megatron_only("set_rng_state", _cpu_set_rng_state)
    _megatron_only("manual_seed", lambda seed: torch.manual_seed(seed))

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = _cpu_set_rng_state
    _patch_optimizer_step_state()
    _CudaToCpuMode().__enter__()  # stays on for the life of the process
    _ACTIVE = True
    return True
