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
recording stand-in (tests/unit/test_sglang_server.py); over NCCL it is unverified (no GPU here)."""

from __future__ import annotations

import inspect
import socket
from datetime import timedelta

import torch.distributed as dist


def free_port(host: str = "") -> int:
    """A TCP port free right now on ``host`` (all interfaces by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
