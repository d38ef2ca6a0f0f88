"""The colocated vLLM engine's memory fraction, sized from what the actor left free.

vLLM 0.32 refuses to start when the device's free memory is below ``ceil(gpu_memory_utilization
x total)`` (``vllm/v1/worker/utils.py::request_memory``); these tests check the sizing against
that rule with the numbers a GPU would report (the measurement itself needs CUDA).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from megacredit.config import load_config
from megacredit.models.tiny import tiny_config
from megacredit.rollout.engine_memory import GIB, EngineNeed, colocated_fraction, engine_need
from megacredit.utils.errors import SetupError

TOTAL = 80 * GIB
QWEN3_8B_NEED = EngineNeed(weights=int(15.3 * GIB), kv_cache=int(2.6 * GIB))
RESERVE = 2 * GIB


def vllm_starts(fraction: float, free: int, total: int) -> bool:
    """vLLM's own start-up rule (request_memory): free >= ceil(total x fraction)."""
    return free >= math.ceil(total * fraction)


def test_the_requested_fraction_is_kept_when_it_fits():
    assert colocated_fraction(0.5, 60 * GIB, TOTAL, QWEN3_8B_NEED, RESERVE) == 0.5


def test_a_fraction_larger_than_what_is_free_is_lowered_so_that_vllm_starts(caplog):
    free = 38 * GIB  # the actor (its weights, gradients, optimizer state) holds 42 GiB
    assert not vllm_starts(0.5, free, TOTAL)  # what the unsized start-up did
    with caplog.at_level(logging.WARNING, logger="megacredit.rollout.engine_memory"):
        fraction = colocated_fraction(0.5, free, TOTAL, QWEN3_8B_NEED, RESERVE)
    assert fraction == 0.45  # (38 - 2) / 80
    assert vllm_starts(fraction, free - RESERVE, TOTAL) and fraction * TOTAL >= QWEN3_8B_NEED.total
    assert "rollout.gpu_memory_utilization=0.5 lowered to 0.45" in caplog.text


def test_an_engine_that_cannot_fit_fails_in_one_line_naming_the_key_and_the_fixes():
    with pytest.raises(SetupError) as info:
        colocated_fraction(0.5, 19 * GIB, TOTAL, QWEN3_8B_NEED, RESERVE)
    message = str(info.value)
    assert "\n" not in message and message.startswith("rollout.gpu_memory_utilization:")
    assert "needs at least 17.9 GiB per GPU" in message and "left 19.0 of 80.0 GiB free" in message
    assert "rollout.placement=remote" in message and "rollout.max_seq_len" in message


def test_a_requested_fraction_below_the_engine_need_says_to_raise_it():
    with pytest.raises(SetupError, match=r"rollout.gpu_memory_utilization=0.1 gives the engine 8.0 GiB .* "
                                         r"raise it \(at most 0.725 fits now\)"):
        colocated_fraction(0.1, 60 * GIB, TOTAL, QWEN3_8B_NEED, RESERVE)


def test_engine_need_counts_weights_and_one_request_of_kv_cache_per_tensor_parallel_rank():
    config = tiny_config("qwen3", num_hidden_layers=36, num_key_value_heads=8, num_attention_heads=32,
                         head_dim=128, hidden_size=4096)
    need = engine_need({"a": (1000, 10), "b": (10,)}, config, 18944, torch.bfloat16, tensor_parallel_size=2)
    assert need.weights == 10010 * 2 // 2
    assert need.kv_cache == 2 * 36 * 8 * 128 * 18944 * 2 // 2  # K and V, 36 layers, bf16, halved by TP


def test_the_builder_sizes_vllm_from_the_checkpoint_and_the_config(tmp_path):
    from megacredit.trainer.builder import vllm_memory_fraction

    config = tiny_config("llama", vocab_size=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.gpu_memory_utilization=0.6",
                             "rollout.sync_bucket_mb=512", "model.dtype=bfloat16"])
    assert vllm_memory_fraction(cfg, config, tmp_path, 256, (70 * GIB, TOTAL)) == 0.6
    # 512 MiB x 2 sync buckets + 1 GiB for contexts are kept free: (30 - 2) / 80
    assert vllm_memory_fraction(cfg, config, tmp_path, 256, (30 * GIB, TOTAL)) == 0.35
    with pytest.raises(SetupError, match="the actor left 2.0 of 80.0 GiB free"):
        vllm_memory_fraction(cfg, config, tmp_path, 256, (2 * GIB, TOTAL))
