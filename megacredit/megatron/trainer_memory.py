"""This rank's trainer state taken off the device while a colocated engine generates.

``rollout.offload_trainer_during_rollout``: a colocated rollout engine (SGLang, vLLM) shares the
GPUs with the trainer, and while it generates the trainer needs none of its state. Four parts:

- ``parameters``: the model chunks' parameters (with the distributed optimizer, the DDP
  buffers they are views of);
- ``gradients``: the DDP gradient buffers (``main_grad``). Not copied: every accumulation starts
  by zeroing them (``optimizer.zero_grads``), so they come back as zeros;
- ``optimizer``: the torch optimizer(s) inside Megatron's: the fp32 main parameters (bf16
  models, the distributed optimizer's shards) and Adam's moments and steps;
- ``teacher``: the EMA teacher's fp32 copy, unless it lives in host memory already
  (``algorithm.teacher.offload_to_host``).

A storage named by two parts belongs to the first of that order (an fp32 model's parameters
ARE the fp32 optimizer's). Each part's storages are released through
:class:`megacredit.utils.storage_stash.StorageStash` (pinned host memory on a GPU, a temporary
file on a CPU; copies, so the training after a restore is bit-identical). The trainer releases
``gradients``, ``optimizer`` and ``teacher`` before the weight sync (the export reads only the
parameters), the parameters for the generation, and restores everything before the next pass
(megacredit/trainer/rl_step.py). Megatron-Core's own offload calls (``DistributedDataParallel.
offload_grad_buffers``, ``MegatronOptimizer.offload_to_cpu``) are CUDA-only (they test
``is_cuda`` and call ``.cuda()``), hence this module.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch

from megacredit.utils.storage_stash import StorageStash, unique_storages

logger = logging.getLogger(__name__)

PARTS = ("parameters", "gradients", "optimizer", "teacher")
"""The parts of the trainer's state, in the order that decides a shared storage's part."""
GIB = 2**30


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors of Megatron's optimizer (a ChainedOptimizer or one MegatronOptimizer): the
    parameters its torch optimizers update and their state (moments, steps)."""
    tensors = []
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if inner is None:  # a stub for a rank without parameters
            continue
        tensors += [param for group in inner.param_groups for param in group["params"]]
        tensors += [value for state in inner.state.values() for value in state.values() if torch.is_tensor(value)]
    return tensors


def part_tensors(model_chunks: Sequence[torch.nn.Module], optimizer, teacher) -> dict[str, list[torch.Tensor]]:
    """The tensors of each part (views of one storage may repeat)."""
    params = [param for chunk in model_chunks for param in chunk.parameters()]
    return {
        "parameters": params,
        "gradients": [param.main_grad for param in params if getattr(param, "main_grad", None) is not None],
        "optimizer": optimizer_tensors(optimizer) if optimizer is not None else [],
        "teacher": teacher.device_tensors() if teacher is not None else [],
    }


class TrainerMemory:
    """Releases parts of this rank's trainer state and restores them all (see the module docstring)."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], optimizer, teacher) -> None:
        self.model_chunks, self.optimizer, self.teacher = list(model_chunks), optimizer, teacher
        self._stashes: dict[str, StorageStash] = {}
        self._logged = False

    @property
    def released(self) -> dict[str, int]:
        """Bytes each released part frees (the parts released now)."""
        return {part: stash.nbytes for part, stash in self._stashes.items()}

    def release(self, parts: Iterable[str] = PARTS) -> dict[str, int]:
        """Release the named parts not released yet; returns the bytes freed now, per part.
        Storages are collected now: Adam's moments only exist after the first step."""
        parts = set(parts)
        unknown = parts - set(PARTS)
        if unknown:
            raise ValueError(f"TrainerMemory.release: unknown parts {sorted(unknown)}; the parts are {PARTS}")
        tensors = part_tensors(self.model_chunks, self.optimizer, self.teacher)
        claimed: list = []
        freed = {}
        for part in PARTS:
            storages = unique_storages(tensors[part], exclude=claimed)
            claimed += storages
            if part in parts and part not in self._stashes and storages:
                stash = StorageStash(storages, keep=[part != "gradients"] * len(storages))
                freed[part] = stash.release()
                self._stashes[part] = stash
        self._log_once()
        return freed

    def restore(self) -> None:
        """Bring every released part back (no-op when none is released)."""
        for part in reversed(list(self._stashes)):
            self._stashes.pop(part).restore()

    def _log_once(self) -> None:
        if self._logged or "parameters" not in self._stashes:  # logged at the first full release
            return
        self._logged = True
        sizes = ", ".join(f"{part} {nbytes / GIB:.2f}" for part, nbytes in self.released.items())
        logger.info("trainer state released during the rollout: %.2f GiB (%s)", sum(self.released.values()) / GIB, sizes)
