"""How many CPUs this process may really use: the thread count for torch and llama.cpp.

`os.cpu_count()` counts the host's CPUs. In a container limited to 2 CPUs on a 64-CPU host
(`docker run --cpus 2`, a Kubernetes CPU limit) it says 64, and 64 compute threads sharing a
2-CPU quota spend most of their time throttled. Here the count is the smallest of the CPUs this
process is pinned to (`sched_getaffinity`) and the cgroup's CPU quota rounded up (cgroup v2
`cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _quota(root: Path) -> float | None:
    """The cgroup's CPU quota in CPUs, or None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "200000 100000" or "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1: -1 means unlimited
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = CGROUP) -> int:
    """CPUs this process can keep busy: affinity, then the cgroup quota (rounded up); at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _quota(cgroup_root)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's thread count: `threads` when given, else torch's default capped at `usable_cpus()`
    (torch defaults to the host's physical cores, which a container's CPU limit does not lower)."""
    import torch

    n = threads or min(torch.get_num_threads(), usable_cpus())
    torch.set_num_threads(n)
    return n


def native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), None when torch cannot say.

    Without it torch's bf16 products run emulated: measured on 2 cores of an AVX2-only AMD EPYC,
    a SmolLM2-sized bf16 product ran at ~20 GFLOP/s against ~140 in fp32 (7x slower), where an
    AMX CPU ran bf16 ~5x faster than fp32. So `precision: bf16` only pays on the first kind."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these (private) probes
        return None


def warn_if_slow_bf16(what: str) -> None:
    """Warn (once per call site) that bf16 on this CPU is emulated and slow; `what` names the work."""
    import warnings

    if native_bf16() is False:
        warnings.warn(f"{what} uses bf16 weights, but this CPU has no native bf16 (no AVX-512 BF16 or AMX): "
                      "its bf16 matrix products are emulated, several times slower than fp32. Set "
                      "precision: fp32 (or auto) for this machine.", RuntimeWarning, stacklevel=3)
