"""A killed rank leaves no checkpoint-writer process behind (megacredit/megatron/writer_queue.py).

Megatron's own writer queue (``filesystem_async._get_write_results_queue``) is served by a
spawned Manager process that outlives a SIGKILLed parent; the queue megacredit installs is
served by one that the kernel kills with it. Each case runs in a child process that makes the
queue, reports its own child processes, and is then SIGKILLed by this test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = """
import json, os, sys
from pathlib import Path
from megatron.core.dist_checkpointing.strategies import filesystem_async
if sys.argv[1] == "megacredit":
    from megacredit.megatron import writer_queue
    writer_queue.install()
queue = filesystem_async._get_write_results_queue()
queue.put("written")
assert queue.get() == "written"
children = [int(pid) for task in Path(f"/proc/{os.getpid()}/task").iterdir()
            for pid in (task / "children").read_text().split()]
print(json.dumps(children), flush=True)
sys.stdin.read()  # until killed
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _children_after_the_parent_is_killed(which: str) -> list[int]:
    """Children of a process that made the writer queue ``which`` way, still alive 10 s after the
    process was SIGKILLed."""
    process = subprocess.Popen([sys.executable, "-c", CHILD, which], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        children = json.loads(process.stdout.readline())
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in children if _alive(pid)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_the_writer_manager_dies_with_a_killed_rank_where_megatrons_own_does_not():
    left_by_megatron = _children_after_the_parent_is_killed("megatron")
    for pid in left_by_megatron:  # ours to end, by PID
        os.kill(pid, signal.SIGKILL)
    assert left_by_megatron, "Megatron's Manager no longer outlives its parent: writer_queue may be unneeded"
    assert _children_after_the_parent_is_killed("megacredit") == []
