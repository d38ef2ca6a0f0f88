"""How much GPU memory a colocated engine may ask for, sized from what the actor left free.

A colocated engine is built after the actor (its weights come from the actor's first sync), so
the actor's weights, gradients, optimizer state and self-teacher already hold device memory when
the engine starts. vLLM then refuses to start unless the device's free memory is at least
``gpu_memory_utilization x total``: ``vllm/v1/worker/utils.py::request_memory`` (vLLM 0.32,
called by ``Worker.init_device`` in ``vllm/v1/worker/gpu_worker.py`` after ``gc.collect()`` and
``torch.accelerator.empty_cache()``, with ``MemorySnapshot.free_memory`` from
``torch.accelerator.get_memory_info``) raises "Free memory on device ... is less than desired GPU
memory utilization". And inside that budget it needs the weights plus the KV cache of one
``max_model_len`` request (``vllm/v1/core/kv_cache_utils.py::_check_enough_kv_cache_memory``).

So ``rollout.gpu_memory_utilization`` is an upper bound: :func:`colocated_fraction` lowers it to
what is free (minus room for the weight sync's buckets and the CUDA contexts), says so in a
warning, and raises one line naming what to change when not even the engine's weights and one
request's KV cache fit. The measurement (:func:`least_free_device_memory`) needs CUDA; the
arithmetic runs anywhere and is what the tests check.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from megacredit.utils.comm import all_gather_objects
from megacredit.utils.errors import SetupError

logger = logging.getLogger(__name__)
GIB = 1 << 30
CONTEXT_RESERVE_BYTES = GIB
"""Kept free besides the sync buckets: the CUDA contexts and NCCL buffers of the engine's own
worker processes, created after this measurement and before vLLM's."""


@dataclass(frozen=True)
class EngineNeed:
    """What one engine device must hold at the least, in bytes."""

    weights: int
    """The engine's share of the model weights (all of them / engine tensor-parallel size)."""
    kv_cache: int
    """The KV cache of one request of ``max_model_len`` tokens (its share)."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def engine_need(manifest: Mapping[str, Sequence[int]], hf_config: Any, max_model_len: int,
                dtype: torch.dtype, tensor_parallel_size: int) -> EngineNeed:
    """The least an engine device holds: its weights (from the HF checkpoint's manifest) and the
    K and V of every layer for ``max_model_len`` tokens, in ``dtype``, split over the engine's TP."""
    element = torch.empty((), dtype=dtype).element_size()
    weights = sum(math.prod(shape) for shape in manifest.values()) * element
    heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kv_cache = 2 * hf_config.num_hidden_layers * heads * head_dim * max_model_len * element
    return EngineNeed(weights // tensor_parallel_size, kv_cache // tensor_parallel_size)


def least_free_device_memory() -> tuple[int, int]:
    """(free, total) bytes of the GPU with the least free memory among the job's ranks (a
    collective: every rank calls it), after this process returned its cached blocks."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return min(all_gather_objects((int(free), int(total))))


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f}"


def colocated_fraction(requested: float, free: int, total: int, need: EngineNeed, reserve: int) -> float:
    """The ``gpu_memory_utilization`` to start a colocated engine with: ``requested``, or less
    when the device has less free (vLLM would refuse to start), rounded down to 1/1000 so that
    ``ceil(total x fraction) <= free - reserve``. ``reserve``: bytes left for the weight sync
    and the engine processes' contexts. Raises SetupError when ``need`` does not fit."""
    fitting = math.floor(max(free - reserve, 0) / total * 1000) / 1000
    fraction = min(requested, fitting)
    if fraction * total < need.total:
        needs = (f"the colocated engine needs at least {_gib(need.total)} GiB per GPU ({_gib(need.weights)} GiB "
                 f"of weights + {_gib(need.kv_cache)} GiB of KV cache for one rollout.max_seq_len request)")
        if requested < fitting:
            raise SetupError(f"rollout.gpu_memory_utilization={requested} gives the engine "
                             f"{_gib(requested * total)} GiB but {needs}; raise it (at most {fitting} fits now)")
        raise SetupError(
            f"rollout.gpu_memory_utilization: {needs} but the actor left {_gib(free)} of {_gib(total)} GiB free "
            f"({_gib(reserve)} GiB of it kept for the weight sync and CUDA contexts); give the actor more GPUs "
            f"(parallel.tensor_model_parallel_size / pipeline_model_parallel_size), lower rollout.max_seq_len "
            f"or rollout.sync_bucket_mb, or run the engine on its own GPUs (rollout.placement=remote)")
    if fraction < requested:
        logger.warning("rollout.gpu_memory_utilization=%s lowered to %s: the actor left %s of %s GiB free on the "
                       "GPU, and vLLM refuses to start with less free than gpu_memory_utilization x total",
                       requested, fraction, _gib(free), _gib(total))
    return fraction
