"""SGLang 0.5.23 colocated in the training job (an ``sglang.Engine`` on the CPU), for real.

1. SmolLM2-135M-Instruct exported from Megatron into SGLang, one SDPO step (its distillation
   loss moves the weights whatever the rewards: SGLang's sampling is not seeded on CPU), sync:
   SGLang's log-probs of a fixed sequence equal megacredit's own (the actor's Megatron forward)
   within 1e-3 per token, before and after the step, and the step moved both by more than 20
   times that. float32 on both sides (SGLang's CPU engine runs the model in float32), so what
   remains is kernel order (torch-native attention vs Megatron's): measured 1.2e-6 to 1.6e-6.
   A wrong shape or an unknown name raises before anything moves and SGLang still generates
   and scores exactly as before; an update SGLang itself refuses (its session already held)
   raises ``WeightSyncError`` with SGLang's message, changes nothing, and the next update works.
2. A short training run (tiny model, the whole loop, validation included) with the sync check on
   every sync and rollout IS on: its metrics hold the sync/ and mismatch figures.

Each scenario starts one engine (20-50 s on 2 cores), in a spawned process it shares with
Megatron, and shuts it down.
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

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOLERANCE = 1e-3


def _refused_by_sglang(run, sequence, greedy_tokens):
    """An update SGLang refuses (its update session is already open: SGLang's own answer, not a
    megacredit check): the error carries SGLang's message, nothing changed, the next one works."""
    import torch

    from megacredit.rollout.base import SamplingParams, WeightSyncError

    engine, out = run.engine, {}
    before = engine.score_logprobs([sequence])[0]
    zeros = [("model.norm.weight", torch.zeros(run.hf_config.hidden_size))]
    assert engine.engine.begin_weight_update()[0]  # someone else holds the session
    try:
        engine.update_weights_from_buckets([zeros])
    except WeightSyncError as error:
        out["refused"] = str(error)
    engine.engine.end_weight_update()
    greedy = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=())
    out["refused_changed_nothing"] = (engine.score_logprobs([sequence])[0] == before and
                                      engine.generate([sequence[:12]], greedy)[0].token_ids == greedy_tokens)
    engine.update_weights_from_buckets([zeros])  # the engine takes updates again
    out["zeroed_norm_moved"] = max(abs(a - b) for a, b in zip(engine.score_logprobs([sequence])[0], before))
    return out


def _smollm2_scenario(rank, world_size, run_dir):
    from megacredit.trainer.loop import setup

    run, train_records, _ = setup(smollm2_engine_config(run_dir, "sdpo", **{"rollout.engine": "sglang"}))
    try:
        out = sync_step_and_refused_updates(run, train_records)
        out.update(_refused_by_sglang(run, out["sequence"], out["greedy"]))
    finally:
        run.engine.shutdown()
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sglang_smollm2"))
    return run_distributed(_smollm2_scenario, world_size=1, timeout=900, run_dir=run_dir)[0]


class TestSGLangColocated(SmolLM2EngineTests):
    engine_type = "SGLangRolloutEngine"
    tolerance = TOLERANCE


def test_an_update_sglang_refuses_raises_with_its_message_and_changes_nothing(smollm2):
    assert "SGLang begin_weight_update failed: a weight-update session is already open" in smollm2["refused"]
    assert "nothing of this update was loaded: the engine keeps its previous weights" in smollm2["refused"]
    assert smollm2["refused_changed_nothing"]
    assert smollm2["zeroed_norm_moved"] > 1.0  # and afterwards an update goes through again


def test_a_short_colocated_training_run_logs_sync_and_mismatch(tmp_path):
    overrides = tiny_overrides("grpo", tmp_path, steps=2, **{
        "rollout.engine": "sglang", "rollout.check_weight_sync_every": 1, "algorithm.rollout_is": "token",
        "validation.after_training": True, "validation.num_prompts": 2, "validation.k": 2})
    records = run_distributed(train_and_read_records, world_size=1, timeout=900, overrides=overrides)[0]
    for record in training_steps_with_sync_and_mismatch(records, TOLERANCE):
        assert record["train/rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-2)
    assert any("val/avg_at_k" in r for r in records)  # validation generated with SGLang too
