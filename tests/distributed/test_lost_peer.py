"""A collective whose peer died or hangs, on real gloo (two spawned processes): the waiting rank
gets an error within the group's timeout, and megacredit's ``lost_peer_fault`` turns exactly that
error into its one line (what torch.distributed really says is matched, not a made-up message).

* peer SIGKILLed: the waiting rank fails at once (the connection closes), long before the timeout;
* peer alive but silent (sleeping past the timeout): the waiting rank fails after the timeout;
* errors that are not a lost peer (a bad argument, an error outside torch.distributed) give None.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from datetime import timedelta

import pytest
import torch

from megacredit.utils.spawn import find_free_port

TIMEOUT_S = 10.0
"""The group's collective timeout in these runs."""


def _rank(rank: int, port: int, mode: str, collective: str, queue) -> None:
    import torch.distributed as dist

    from megacredit.megatron.distributed import lost_peer_fault

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=TIMEOUT_S))
    if rank == 1:
        if mode == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(TIMEOUT_S * 3)  # "hung": alive, never joins the collective
        return
    start = time.monotonic()
    try:
        if collective == "all_reduce":
            dist.all_reduce(torch.ones(4))
        else:
            dist.all_gather([torch.zeros(4), torch.zeros(4)], torch.ones(4))
        queue.put((None, "the collective succeeded", time.monotonic() - start))
    except Exception as error:  # noqa: BLE001 - the error under test
        fault = lost_peer_fault(error, 0, TIMEOUT_S / 60)
        queue.put((None if fault is None else str(fault), str(error), time.monotonic() - start))
    queue.close()
    queue.join_thread()  # the answer is written before the exit below
    os._exit(0)  # the default group's teardown would wait for the lost peer


def _waiting_rank_outcome(mode: str, collective: str = "all_reduce") -> tuple[str | None, str, float]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), find_free_port()
    processes = [ctx.Process(target=_rank, args=(rank, port, mode, collective, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        return queue.get(timeout=TIMEOUT_S * 2 + 120)  # spawn + import on a loaded machine, then the bound
    finally:
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(30)


@pytest.mark.timeout(600)
def test_a_killed_peer_fails_the_collective_at_once_with_one_line():
    line, error, waited = _waiting_rank_outcome("killed")
    assert line is not None, f"gloo's error was not recognised as a lost peer: {error}"
    assert line.startswith("rank 0: a collective failed (") and "\n" not in line, line
    assert "parallel.collective_timeout_minutes=" in line and "checkpoint.resume=auto" in line, line
    assert waited < TIMEOUT_S, f"waited {waited:.1f} s: a dead peer should not need the timeout"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("collective", ["all_reduce", "all_gather"])  # gloo words their timeouts differently
def test_a_silent_peer_fails_the_collective_after_the_timeout_with_one_line(collective):
    line, error, waited = _waiting_rank_outcome("hung", collective)
    assert line is not None, f"gloo's error was not recognised as a lost peer: {error}"
    assert line.startswith("rank 0: a collective failed (") and "\n" not in line, line
    assert TIMEOUT_S * 0.9 <= waited < TIMEOUT_S + 30, f"waited {waited:.1f} s for a {TIMEOUT_S} s timeout"


def test_other_errors_are_not_a_lost_peer():
    from megacredit.megatron.distributed import lost_peer_fault

    with pytest.raises(RuntimeError) as outside:  # the words, but not raised by torch.distributed
        raise RuntimeError("Connection reset by peer")
    assert lost_peer_fault(outside.value, 0, 1.0) is None
    with pytest.raises((RuntimeError, ValueError)) as inside:  # torch.distributed's, not a lost peer
        torch.distributed.all_reduce(torch.ones(1))  # no process group
    assert lost_peer_fault(inside.value, 0, 1.0) is None
