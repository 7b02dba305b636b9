"""How many CPU cores this process may use, and the pipeline's default thread count from it.

Why its own module: the tile-reading/stitching threads must scale with the host (two on a 2-core
VM, sixteen on a 16-core GPU host) without anyone tuning a number, and "the cores we have" is
not ``os.cpu_count()`` in a container: a CPU affinity mask or a cgroup quota (``docker run
--cpus``, a Kubernetes limit) gives the process fewer. Reading more threads than cores only adds
contention; fewer leaves the GPU waiting. Standard library only: the service's settings (read by
the API process too) take their default from here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
# Beyond this the reader threads contend on the GIL for their Python glue and OpenSlide's tile
# cache lock; a host with more cores keeps them for other work (and more workers).
MAX_DEFAULT_THREADS = 32


def _cgroup_quota_cpus() -> float | None:
    """CPUs allowed by a cgroup CPU quota, or None when there is none (or it cannot be read)."""
    try:
        if CGROUP_V2_CPU_MAX.is_file():
            quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if CGROUP_V1_QUOTA.is_file() and CGROUP_V1_PERIOD.is_file():
            quota_us = int(CGROUP_V1_QUOTA.read_text())
            return None if quota_us <= 0 else quota_us / int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """Cores this process may run on: the affinity mask, lowered by a cgroup quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def default_pipeline_threads() -> int:
    """Reader/stitcher threads of one slide run: one per available core (capped)."""
    return min(MAX_DEFAULT_THREADS, available_cpus())
