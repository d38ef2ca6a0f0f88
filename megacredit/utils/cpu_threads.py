"""One share of the CPU cores per local rank, so that ranks on one node do not oversubscribe it.

By default each process's torch (OpenMP) thread pool uses every core it may run on. When several
ranks share a node's cores, each spins that many threads on the same cores, and on this project's
2-core machines two such processes slowed each other down by up to 27x (the embedded engine took
27 s for a generation that takes 1 s with one thread per process). torchrun already sets
``OMP_NUM_THREADS=1`` for each of several local processes; ``srun`` with several tasks per node
does not, so ``megacredit train`` does it: threads = usable cores // local ranks (at least 1).

Nothing changes when the user chose (``OMP_NUM_THREADS`` set), when there is one local rank,
or when the launcher already pinned the process to fewer cores than the node has (``srun
--cpu-bind``, ``--cpus-per-task`` with binding: the affinity mask is then this rank's share).
"""

from __future__ import annotations

import os
import re
from typing import Mapping


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    """Tasks of this job step on this node, from ``SLURM_STEP_TASKS_PER_NODE`` or
    ``SLURM_TASKS_PER_NODE`` (format ``2(x3),1``: 2 tasks on each of 3 nodes, then 1)."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    per_node: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        per_node += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return per_node[node] if 0 <= node < len(per_node) else None


def local_ranks(env: Mapping[str, str]) -> int:
    """How many ranks of this job run on this node (1 without a launcher)."""
    if "LOCAL_WORLD_SIZE" in env:  # torchrun
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    if "SLURM_PROCID" in env:
        return max(1, _slurm_tasks_on_this_node(env) or 1)
    return 1


def threads_per_rank(env: Mapping[str, str], usable_cores: int, node_cores: int) -> int | None:
    """The thread count to set, or None to leave torch's default (see the module docstring)."""
    if env.get("OMP_NUM_THREADS"):
        return None
    ranks = local_ranks(env)
    if ranks <= 1 or usable_cores < node_cores:
        return None
    return max(1, usable_cores // ranks)


def limit_threads_per_local_rank() -> int | None:
    """Apply :func:`threads_per_rank` to this process (torch and the ``OMP_NUM_THREADS`` its
    children inherit); returns the count set, or None when nothing was changed."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads_per_rank(os.environ, usable, os.cpu_count() or usable)
    if threads is None:
        return None
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    return threads
