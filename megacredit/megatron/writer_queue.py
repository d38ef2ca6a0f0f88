"""Megatron's checkpoint writer queue, served by a process that dies with its rank.

Every ``dist_checkpointing.save`` with the torch_dist strategy (synchronous saves included) writes
through ``FileSystemWriterAsync``, which takes its results queue from a ``multiprocessing``
Manager that it starts, with the "spawn" context, on a rank's first save
(``megatron/core/dist_checkpointing/strategies/filesystem_async.py::_get_write_results_queue``).
When the rank exits normally, multiprocessing shuts that Manager down; when the rank is killed
(the OOM killer, SIGKILL from a launcher), the Manager is left serving forever (seen here: one
200-280 MB orphan per killed rank in tests/integration/test_rank_faults.py, until reboot or the
end of the Slurm job).

:func:`install` gives Megatron a queue from a Manager of our own whose server process asks the
kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux), before Megatron
starts its own. Elsewhere it does nothing and Megatron's Manager is used as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_manager = None


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the Manager's server process before it serves (a spawn-picklable initializer)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the rank died before the request took effect
        os._exit(1)


def install() -> None:
    """Once per process, before the first save: Megatron's writer results queue from a Manager
    that the kernel kills with this process. Idempotent; a no-op off Linux or when Megatron
    already made its queue."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None or not sys.platform.startswith("linux") or filesystem_async._results_queue is not None:
        return
    import multiprocessing
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    _manager = manager

