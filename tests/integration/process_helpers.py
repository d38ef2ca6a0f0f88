"""Finding and ending, by PID, the processes a fault test started (a subprocess started with
``start_new_session=True`` and everything it forked or spawned share its session id)."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path


def session_pids(session: int) -> list[int]:
    """PIDs of the live processes whose session id is ``session`` (the PID of its leader)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` (those that already exited are skipped)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def running_servers(servers: list):
    """``servers`` (megacredit.rollout.server_process.ServerProcess) started in parallel; every one
    is stopped by its PID afterwards (also when a start failed)."""
    try:
        with ThreadPoolExecutor(len(servers)) as threads:
            list(threads.map(lambda server: server.start(), servers))
        yield servers
    finally:
        for server in servers:
            server.stop()
