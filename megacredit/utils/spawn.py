"""Launch a function on N local processes joined by a gloo process group.

Used by the distributed tests (and usable from scripts) to prove that a parallel path equals
the single-process result: each rank runs ``fn(rank, world_size, **kwargs)`` in a fresh
``spawn``-ed interpreter with ``torch.distributed`` initialised (gloo, localhost), and the
return values come back to the caller as a list ordered by rank. ``fn`` must be a
module-level function (importable by name in the child).
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _worker(rank: int, world_size: int, port: int, fn: Callable, kwargs: dict, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, **kwargs)
        queue.put((rank, True, _to_bytes(result)))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, timeout: float = 600.0, **kwargs) -> list:
    """Run ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo processes.

    Returns the per-rank return values (ordered by rank). Raises ``RuntimeError`` carrying the
    child's traceback if any rank fails, and ``TimeoutError`` if the ranks do not finish in
    ``timeout`` seconds (all children are terminated either way).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = find_free_port()
    processes = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, kwargs, queue), daemon=False)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    errors.append(f"rank {processes.index(dead[0])} died with exit code {dead[0].exitcode}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run of {fn.__name__} timed out after {timeout}s")
                continue
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
    finally:
        for process in processes:
            process.join(timeout=5 if errors else 60)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[rank] for rank in range(world_size)]
