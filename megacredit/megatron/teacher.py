"""The self-teacher's weights, kept beside the policy and swapped into the same sharded modules.

There is no second model instance: the teacher is ONE fp32 copy of this rank's parameter
shards (same TP/PP sharding). ``swapped_in(model_chunks)`` copies it into the policy's
parameters for a forward-only pass and restores the policy bit-exactly afterwards from a copy
of the policy made for that pass in host memory (pinned next to a GPU) and dropped after it:
no second device-sized buffer is kept between passes. With ``on_host`` the fp32 copy itself
lives in host memory between passes: the swap copies it into the parameters from there and the
EMA update moves each tensor through the parameters' device (the same ``lerp_`` there).
benchmarks/README.md ("Lean EMA teacher") gives what both cost per step.

Two kinds (CREDIT Table 3: EMA rate 0.01; RLSD section 5: hard copy every 10 steps):
- ``ema``: pi_ref <- (1 - r) pi_ref + r pi_theta after every optimizer step (CREDIT/SDPO, r=0.01).
- ``hard_copy``: pi_ref <- pi_theta every ``sync_every`` steps, frozen between (RLSD, every 10).
The EMA is accumulated in fp32 even when the parameters are bf16.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Sequence

import torch

from megacredit.utils.storage_stash import host_copy

TeacherKind = Literal["ema", "hard_copy"]


def _parameters(model_chunks: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [param for chunk in model_chunks for param in chunk.parameters()]


class TeacherWeights:
    """This rank's shard of the self-teacher weights."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], kind: TeacherKind = "ema",
                 ema_rate: float = 0.01, sync_every: int = 10, on_host: bool = False) -> None:
        if kind not in ("ema", "hard_copy"):
            raise ValueError(f"algorithm.teacher.kind must be 'ema' or 'hard_copy', got {kind!r}")
        if kind == "ema" and not 0.0 < ema_rate <= 1.0:
            raise ValueError(f"algorithm.teacher.ema_rate must be in (0, 1], got {ema_rate}")
        if kind == "hard_copy" and sync_every < 1:
            raise ValueError(f"algorithm.teacher.sync_every must be >= 1, got {sync_every}")
        self.kind, self.ema_rate, self.sync_every = kind, float(ema_rate), int(sync_every)
        self.on_host = bool(on_host)
        params = _parameters(model_chunks)
        if self.on_host:
            self.tensors = [host_copy(param, torch.float32) for param in params]
        else:
            self.tensors = [param.detach().to(torch.float32).clone() for param in params]

    @torch.no_grad()
    def after_optimizer_step(self, model_chunks: Sequence[torch.nn.Module]) -> None:
        """EMA rule pi_ref <- (1 - r) pi_ref + r pi_theta, after every optimizer step."""
        if self.kind != "ema":
            return
        for teacher, param in zip(self.tensors, _parameters(model_chunks)):
            work = teacher.to(param.device)  # the teacher itself unless it lives in host memory
            work.lerp_(param.detach().to(torch.float32), self.ema_rate)
            if work is not teacher:
                teacher.copy_(work)

    @torch.no_grad()
    def after_training_step(self, model_chunks: Sequence[torch.nn.Module], step: int) -> None:
        """Hard-copy rule: pi_ref <- pi_theta when ``step`` (completed training steps) is a
        multiple of ``sync_every``; frozen in between."""
        if self.kind != "hard_copy" or step % self.sync_every:
            return
        for teacher, param in zip(self.tensors, _parameters(model_chunks)):
            teacher.copy_(param.detach())

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model_chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
        """Run the body with the teacher weights in the policy's modules; restore exactly after
        (from a host copy of the policy that lives only as long as the body)."""
        params = _parameters(model_chunks)
        policy = [host_copy(param) for param in params]
        for teacher, param in zip(self.tensors, params):
            param.copy_(teacher)
        try:
            yield
        finally:
            for saved, param in zip(policy, params):
                param.copy_(saved)

    def tensor_of(self, model_chunks: Sequence[torch.nn.Module], param: torch.nn.Parameter) -> torch.Tensor:
        """The teacher's copy of the policy parameter ``param`` (fp32, same shard)."""
        for teacher, candidate in zip(self.tensors, _parameters(model_chunks)):
            if candidate is param:
                return teacher
        raise KeyError("tensor_of: the parameter is not one of the model chunks' parameters")

    def device_tensors(self) -> list[torch.Tensor]:
        """The teacher tensors held in the parameters' memory ([] when they live in host memory;
        what megacredit.megatron.trainer_memory releases during a rollout)."""
        return [] if self.on_host else self.tensors

    def state_tensors(self) -> list[torch.Tensor]:
        """The teacher tensors, in parameter order (for checkpointing)."""
        return self.tensors

    @torch.no_grad()
    def load_state_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Restore teacher tensors saved by :meth:`state_tensors`."""
        if len(tensors) != len(self.tensors):
            raise ValueError(f"teacher checkpoint has {len(tensors)} tensors, the model {len(self.tensors)}")
        for target, source in zip(self.tensors, tensors):
            if target.shape != source.shape:
                raise ValueError(f"teacher checkpoint tensor shape {tuple(source.shape)} != {tuple(target.shape)}")
            target.copy_(source)
