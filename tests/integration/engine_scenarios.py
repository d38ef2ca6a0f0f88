"""The scenario the rollout-engine tests share (vLLM here, SGLang in tests/sglang_cpu/): SmolLM2
set up by the trainer with a given engine, synced, one training step, synced again, then updates
with a wrong shape and an unknown name. Runs inside a ``run_distributed`` process."""

from __future__ import annotations

from typing import Any

import pytest

SEQUENCE_TEXT = "Question: what is 7 + 5? Answer: 12. The weights were synced into the rollout engine."


def smollm2_engine_config(run_dir: str, method: str = "grpo", **engine_overrides: Any):
    """SmolLM2-135M-Instruct, ``method`` (GRPO by default), 2 prompts x 2 samples x 6 tokens, the
    sync check on every sync; ``engine_overrides`` choose the engine (``rollout.engine``,
    placement, urls...). GRPO's step moves the weights only when a group's rewards differ, which
    seeded engines (vLLM) make reproducible; engines that cannot honour the seeds on CPU (SGLang)
    use SDPO, whose distillation loss moves them whatever the rewards."""
    from megacredit.config import load_config

    overrides = {
        "model.name_or_path": "smollm2-135m-instruct", "algorithm.name": method, "algorithm.group_size": 2,
        "rollout.temperature": 0.7,  # engine and trainer both score the tempered distribution
        "rollout.max_new_tokens": 6, "rollout.max_seq_len": 256,
        "rollout.check_weight_sync_every": 1, "data.prompts_per_step": 2, "data.num_generated_train": 8,
        "data.num_generated_val": 2, "training.ppo_mini_batch_size": 2, "optimizer.lr": 3e-4,
        "parallel.micro_batch_tokens": 512, "logging.run_dir": run_dir, "logging.tensorboard": False,
        "logging.console": False, "validation.before_training": False, "checkpoint.resume": "none",
        **engine_overrides,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def sync_step_and_refused_updates(run, train_records) -> dict[str, Any]:
    """On a set-up run: sync 0, the engine's and the actor's log-probs of a fixed sequence
    before and after one training step (and its sync), then a wrong shape and an unknown name
    (each refused before anything is copied), and whether the engine still generates and scores
    exactly as before them. Returns what the tests assert on."""
    import torch

    from megacredit.rollout.base import SamplingParams
    from megacredit.trainer.rl_step import run_step
    from megacredit.trainer.rollout import PromptStream
    from megacredit.trainer.weight_sync import sync_weights

    engine, actor, hf_config = run.engine, run.actor, run.hf_config
    sequence = run.tokenizer(SEQUENCE_TEXT)["input_ids"]

    def both():
        return engine.score_logprobs([sequence])[0], actor.score_sequences([sequence])[0].tolist()

    out: dict[str, Any] = {"engine_type": type(engine).__name__, "sequence": sequence,
                           "first_sync": sync_weights(run)}
    out["before"] = both()
    out["step"] = {k: v for k, v in run_step(run, 0, PromptStream(train_records, 2, 7).batch(0)).items()
                   if not k.startswith("_")}
    out["after"] = both()
    tempered = SamplingParams(temperature=0.7, max_new_tokens=8, seed=1, stop_token_ids=())
    sample = engine.generate([sequence[:12]], tempered)[0]
    out["tempered"] = (sample.logprobs, *[
        actor.score_sequences([sequence[:12] + sample.token_ids], temperature=t)[0][-len(sample.token_ids):].tolist()
        for t in (0.7, 1.0)])
    greedy = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=())
    out["greedy"] = engine.generate([sequence[:12]], greedy)[0].token_ids
    hidden, ffn = hf_config.hidden_size, hf_config.intermediate_size
    for label, bucket in [("wrong_shape", [("model.norm.weight", torch.zeros(hidden + 1))]),
                          ("unknown_name", [("model.layers.0.mlp.gate_projj.weight", torch.zeros(ffn, hidden))])]:
        try:
            engine.update_weights_from_buckets([bucket])
        except (KeyError, ValueError) as error:
            out[label] = str(error)
    out["still_generates"] = engine.generate([sequence[:12]], greedy)[0].token_ids == out["greedy"]
    out["unchanged_scores"] = engine.score_logprobs([sequence])[0] == out["after"][0]
    return out


def max_diff(pair) -> float:
    """Largest per-token difference of two log-prob lists."""
    return max(abs(a - b) for a, b in zip(*pair))


def assert_synced_and_moved(result: dict[str, Any], tolerance: float, moved_factor: float = 20.0) -> None:
    """Engine and actor agree within ``tolerance`` before and after the step, and the step
    (carried into the engine by the sync) moved both by more than ``moved_factor`` x it."""
    before, after = result["before"], result["after"]
    assert len(before[0]) == len(before[1]) > 10
    print(f"max |engine - megacredit| per token: before {max_diff(before):.2e}, after {max_diff(after):.2e}; "
          f"moved by the step: megacredit {max_diff((before[1], after[1])):.2e}, "
          f"engine {max_diff((before[0], after[0])):.2e}")
    assert max_diff(before) < tolerance, max_diff(before)
    assert max_diff(after) < tolerance, max_diff(after)
    assert max_diff((before[1], after[1])) > moved_factor * tolerance
    assert max_diff((before[0], after[0])) > moved_factor * tolerance


def assert_tempered_logprobs_equal_the_trainers(result: dict[str, Any], tolerance: float) -> None:
    """Tokens sampled at T = 0.7: the engine's log-probs are log_softmax(logits / T), as the
    trainer's forward at T gives them, and differ from the T = 1 ones (issue 19: every pass and
    every engine at the rollout temperature)."""
    engine, trainer, untempered = result["tempered"]
    assert len(engine) == 8
    assert max_diff((engine, trainer)) < tolerance, max_diff((engine, trainer))
    assert max_diff((engine, untempered)) > 20 * tolerance


def assert_refused_updates_changed_nothing(result: dict[str, Any]) -> None:
    assert "'model.norm.weight' has shape (577,)" in result["wrong_shape"]
    assert "unknown tensor name 'model.layers.0.mlp.gate_projj.weight'" in result["unknown_name"]
    assert "did you mean 'model.layers.0.mlp.gate_proj.weight'" in result["unknown_name"]
    assert result["still_generates"] and result["unchanged_scores"]


def assert_step_logged_sync_and_mismatch(result: dict[str, Any], tolerance: float) -> None:
    """The scenario's training step (sync check on) logged the sync/ and mismatch figures."""
    step = result["step"]
    assert step["sync/bytes"] > 5e8  # SmolLM2 in float32 is ~0.54 GB
    assert step["sync/gb_per_s"] > 0 and step["sync/probe_logprob_diff"] < tolerance
    assert 0 <= step["rollout/logprob_abs_diff"] < tolerance and abs(step["rollout/engine_kl"]) < tolerance
    assert result["first_sync"]["sync/probe_logprob_diff"] < tolerance


def training_steps_with_sync_and_mismatch(records: list[dict], tolerance: float, steps: int = 2) -> list[dict]:
    """The training records of a short run (``train_and_read_records``) after checking that each
    of its ``steps`` steps logged the sync/ figures of a checked sync and the mismatch figures."""
    logged = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    for record in logged:
        assert record["sync/bytes"] > 0 and record["sync/probe_logprob_diff"] < tolerance
        assert record["rollout/logprob_abs_diff"] < tolerance and "rollout/engine_kl" in record
    return logged


class SmolLM2EngineTests:
    """The tests every engine's SmolLM2 scenario passes. A test module subclasses it as
    ``Test...`` with ``engine_type`` (the engine class the trainer must have built) and
    ``scenario_fixture``: the name of its module-scoped fixture returning the result of
    :func:`sync_step_and_refused_updates`."""

    engine_type = ""
    scenario_fixture = "smollm2"
    tolerance = 1e-3

    @pytest.fixture
    def engine_scenario(self, request):
        return request.getfixturevalue(self.scenario_fixture)

    def test_logprobs_equal_megacredits_before_and_after_a_training_step(self, engine_scenario):
        assert engine_scenario["engine_type"] == self.engine_type
        assert_synced_and_moved(engine_scenario, self.tolerance)

    def test_the_step_logs_sync_and_mismatch_figures(self, engine_scenario):
        assert_step_logged_sync_and_mismatch(engine_scenario, self.tolerance)

    def test_sampled_logprobs_at_temperature_equal_the_trainers(self, engine_scenario):
        """Sampled at T = 0.7, the engine reports log_softmax(logits / T) of its tokens (vLLM:
        logprobs_mode processed_logprobs; SGLang: without SGLANG_RETURN_ORIGINAL_LOGPROB), which
        the trainer's Megatron forward at T gives too, not the T = 1 ones."""
        assert_tempered_logprobs_equal_the_trainers(engine_scenario, self.tolerance)

    def test_a_bad_sync_raises_and_the_engine_keeps_its_weights(self, engine_scenario):
        assert_refused_updates_changed_nothing(engine_scenario)
