"""A process group between a trainer rank and inference-engine processes, outside the job's world.

Engines that receive weights by NCCL broadcast (SGLang's ``init_weights_update_group``) join a
group of their own: the trainer's sending rank is rank 0, the engines' GPUs ranks 1..N, and
it rendezvous over TCP at an address the trainer chooses. SGLang builds its side with
``init_custom_process_group`` (sgl-project/sglang, ``python/sglang/srt/utils/common.py``): a
TCP rendezvous (``init_method="tcp://host:port"``), a ``PrefixStore`` named after the group,
and ``torch.distributed.distributed_c10d._new_process_group_helper``; its
``ModelRunner.init_weights_update_group`` joins as ``rank_offset + tp_rank``. The trainer
must join the same store the same way, which :func:`join_weight_update_group` does (the
trainer keeps its own default group; this one is separate). It relies on torch's private
``_new_process_group_helper``, as SGLang, slime and OpenRLHF do. Verified on gloo against real
SGLang 0.5.23 servers on the CPU (tests/sglang_cpu/test_sglang_server_cpu.py) and against the
recording stand-in (tests/unit/test_sglang_server.py); over NCCL it is unverified (no GPU here).

vLLM servers join the same kind of group through megacredit's worker extension
(``MegacreditWorkerExtension.megacredit_join_weight_group``, megacredit/rollout/vllm.py). The
servers' part of each step runs inside an HTTP call (SGLang's ``/init_weights_update_group``,
vLLM's ``/collective_rpc``) that answers only after the collective: :func:`join_watching` and
:func:`broadcast_watching` run the trainer's part while watching those calls, so a server that
refuses fails the update at once instead of leaving this rank in a collective nobody joins."""

from __future__ import annotations

import inspect
import itertools
import socket
import threading
import time
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from megacredit.rollout.base import WeightSyncError

POLL_SECONDS = 0.01
Check = Callable[[str, Future], None]
"""Raises (``WeightSyncError``) when a server's finished call (url, future) failed."""
_RESERVED_NAMES: set[str] = set()
_NAMES_LOCK = threading.Lock()


def reserve_group_name(base: str) -> str:
    """``base``, else ``base_1``, ``base_2``, ...: the first name that no process group of this
    process holds and no caller reserved (torch refuses a second group of the same name, and the
    engines of an EnginePool connect in parallel). Given back by :func:`release_group_name`
    once its group is destroyed; an abandoned group keeps its name."""
    from torch.distributed.distributed_c10d import _world  # noqa: PLC0415 - private, like the join

    with _NAMES_LOCK:
        taken = _RESERVED_NAMES | set(_world.pg_names.values())
        name = next(n for n in (f"{base}_{k}" if k else base for k in itertools.count()) if n not in taken)
        _RESERVED_NAMES.add(name)
        return name


def release_group_name(name: str) -> None:
    with _NAMES_LOCK:
        _RESERVED_NAMES.discard(name)


def free_port(host: str = "") -> int:
    """A TCP port free right now on ``host`` (all interfaces by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def route_address(url: str) -> str:
    """This host's IP address on the route to ``url``'s host (a UDP socket's local end after
    ``connect``; no packet is sent): where a server reaches this process for the group."""
    parts = urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((parts.hostname, parts.port or 80))
        return sock.getsockname()[0]


def join_weight_update_group(
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str,
    backend: str = "nccl",
    timeout: timedelta = timedelta(minutes=10),
) -> dist.ProcessGroup:
    """Join (rank 0: host) the group ``group_name`` of ``world_size`` ranks rendezvousing at
    ``tcp://master_address:master_port``. Blocks until every rank joined or ``timeout``."""
    from torch.distributed.distributed_c10d import (  # noqa: PLC0415 - private, like SGLang's
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    if not group_name:
        raise ValueError("join_weight_update_group: group_name must not be empty")
    host = f"[{master_address}]" if ":" in master_address else master_address
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    parameters = inspect.signature(_new_process_group_helper).parameters
    options = "backend_options" if "backend_options" in parameters else "pg_options"
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout,
        **{options: None},
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def wait_watching(done: Callable[[], bool], watched: Mapping[str, Future], check: Check, timeout: float,
                  timeout_message: str) -> None:
    """Wait until ``done()`` while watching the servers' calls (``watched``: url -> future): a
    finished one goes through ``check`` at once (a refusal raises), and ``timeout`` seconds
    without ``done()`` raise ``WeightSyncError(timeout_message + who has not answered)``."""
    deadline = time.monotonic() + timeout
    while not done():
        for url, future in watched.items():
            if future.done():
                check(url, future)
        if time.monotonic() > deadline:
            waiting = [url for url, future in watched.items() if not future.done()]
            raise WeightSyncError(f"{timeout_message} (no answer yet from {waiting})")
        time.sleep(POLL_SECONDS)


def join_watching(master_address: str, master_port: int, world_size: int, group_name: str, backend: str,
                  watched: Mapping[str, Future], check: Check, timeout: float, what: str) -> dist.ProcessGroup:
    """Join as rank 0 (:func:`join_weight_update_group`, in a daemon thread: a rendezvous a
    refusing server never joins cannot hold this process) while watching the servers' join
    calls; then wait for every call's answer and check it. Returns the group."""
    joined: dict[str, Any] = {}

    def join() -> None:
        try:
            joined["group"] = join_weight_update_group(master_address, master_port, world_size, 0,
                                                       group_name, backend, timedelta(seconds=timeout))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            joined["error"] = error

    thread = threading.Thread(target=join, name=f"{group_name}-join", daemon=True)
    thread.start()
    message = f"{what}: not done after {timeout:.0f} s"
    wait_watching(lambda: not thread.is_alive(), watched, check, timeout, message)
    if "error" in joined:
        raise joined["error"]
    wait_watching(lambda: all(f.done() for f in watched.values()), watched, check, timeout, message)
    for url, future in watched.items():
        check(url, future)
    return joined["group"]


def broadcast_watching(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, watched: Mapping[str, Future],
                       check: Check, timeout: float, timeout_message: str,
                       abandon: Callable[[], None]) -> None:
    """Broadcast ``tensors`` from rank 0 of ``group`` asynchronously while watching the servers'
    receiving calls, then wait for every call's answer (each after its load) and check it. If
    the broadcast itself does not complete (a server refused before receiving, or the
    timeout), ``abandon()`` is called before raising: this rank's send may stay pending, so
    the group is not to be reused. A failure after the broadcast keeps the group (intact: the
    servers received)."""
    works = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
    try:
        wait_watching(lambda: all(w.is_completed() for w in works), watched, check, timeout, timeout_message)
    except WeightSyncError:
        abandon()
        raise
    wait_watching(lambda: all(f.done() for f in watched.values()), watched, check, timeout, timeout_message)
    for url, future in watched.items():
        check(url, future)
