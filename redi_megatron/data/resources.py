"""How many worker processes this machine can afford: usable cores, bounded by available memory.

``os.cpu_count()`` is the wrong default on a big node: it counts cores this process may not use
(cgroup/affinity) and ignores memory (128 cores x 0.3 GB = 38 GB for curation alone).
"""
from __future__ import annotations

import os
from typing import Optional

TOKENIZE_WORKER_BYTES = 512 << 20   # a tokenizer copy + one shard of text and ids
CURATE_WORKER_BYTES = 300 << 20     # measured: a curation worker peaks near 0.3 GB (issue 21)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which cgroups/Slurm set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> Optional[int]:
    """Limit minus usage of this process's cgroup (v2, else v1); None when unlimited or unknown."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_f) as f:
                raw = f.read().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            with open(usage_f) as f:
                usage = int(f.read().strip())
            return max(0, int(raw) - usage)
        except (OSError, ValueError):
            continue
    return None


def available_memory() -> Optional[int]:
    """Bytes this process can still use: the smaller of MemAvailable and its cgroup's headroom."""
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(values) if values else None


def worker_count(requested: int, per_worker_bytes: int) -> int:
    """``requested`` when >= 1; 0 = auto: the usable cores, bounded by available memory at
    ``per_worker_bytes`` a worker, at least 1."""
    if requested >= 1:
        return requested
    if requested < 0:
        raise ValueError(f"worker count must be >= 0 (0 = auto), got {requested}")
    n = usable_cores()
    mem = available_memory()
    if mem is not None:
        n = min(n, mem // per_worker_bytes)
    return max(1, int(n))
