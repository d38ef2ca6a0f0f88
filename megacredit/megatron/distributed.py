"""Distributed start-up: one function from a torchrun or Slurm environment to Megatron groups.

``initialize(tp, pp, seed)`` reads the launcher's environment, starts ``torch.distributed``
(NCCL on GPU, gloo on CPU), switches on the CPU compatibility layer when CUDA is absent,
initialises Megatron-Core's ``parallel_state`` (TP, PP, and DP = world / (TP*PP); with
``expert_model_parallel_size`` EP > 1 also the expert groups: EP ranks split each MoE layer's
experts, folded over the TP x DP ranks of a stage, experts not split over TP) and seeds
the RNG tracker. Every later component receives the resulting :class:`ParallelContext`
rather than reading globals itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch

from megacredit.megatron import cpu_compat
from megacredit.utils.errors import ParallelLayoutError, expert_layout_problem, parallel_layout_problem


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as read from the launcher's environment."""

    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    master_addr: str
    """Host of rank 0 (the rendezvous address)."""
    master_port: int
    """Rendezvous TCP port."""
    launcher: str
    """"torchrun", "slurm" or "single"."""


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: "node[03-05,07],gpu1" -> "node03"."""
    match = re.match(r"^([^\[,]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def read_launch_env(environ: Mapping[str, str] | None = None, default_port: int = 29500) -> LaunchEnv:
    """Read torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/...) variables.

    torchrun's variables win when both are present (torchrun inside an sbatch allocation).
    Without either, this is a single-process run.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", default_port)), "single")


@dataclass(frozen=True)
class ParallelContext:
    """The parallel layout of this process, handed down to every component."""

    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int
    world_size: int
    backend: str
    device: torch.device
    ep_size: int = 1
    """Expert-parallel size: ranks that split each MoE layer's experts (1 for dense models)."""
    ep_rank: int = 0
    """This rank's index in its expert-parallel group."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _validate_layout(world_size: int, tp: int, pp: int, launcher: str | None = None, ep: int = 1) -> None:
    problem = parallel_layout_problem(world_size, tp, pp, launcher) or expert_layout_problem(world_size, pp, ep)
    if problem is not None:
        raise ParallelLayoutError(problem)


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 30,
    expert_model_parallel_size: int = 1,
) -> ParallelContext:
    """Start torch.distributed (if needed) and Megatron's parallel state; seed the RNG tracker.

    Safe to call when the process group already exists (e.g. tests' launcher): it reuses it.
    """
    launch = read_launch_env()  # checked first: a bad layout fails before Megatron is imported
    _validate_layout(launch.world_size, tensor_model_parallel_size, pipeline_model_parallel_size, launch.launcher,
                     expert_model_parallel_size)
    from megatron.core import parallel_state, tensor_parallel

    cpu = not cpu_compat.cuda_available()
    if cpu:
        cpu_compat.enable_cpu_compat()
    backend = backend or ("gloo" if cpu else "nccl")
    if not torch.distributed.is_initialized():
        if launch.launcher == "single" and "MASTER_PORT" not in os.environ:
            from megacredit.utils.spawn import find_free_port

            launch = LaunchEnv(0, 1, 0, "127.0.0.1", find_free_port(), "single")
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        if not cpu:
            torch.cuda.set_device(launch.local_rank)
        torch.distributed.init_process_group(
            backend=backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=1,
        create_gloo_process_groups=not cpu,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return current_context()


def current_context() -> ParallelContext:
    """The :class:`ParallelContext` of the already-initialised Megatron parallel state."""
    from megatron.core import parallel_state as ps

    return ParallelContext(
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        backend=torch.distributed.get_backend(),
        device=cpu_compat.device(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
    )


def shutdown() -> None:
    """Tear down Megatron's groups and the process group (idempotent)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
