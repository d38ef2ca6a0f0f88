"""Skipping the old-policy forward (one mini-batch, one PPO epoch) changes nothing: for every
method, the loss, every gradient, the updated weights, the old-policy and teacher results and the
advantages equal those of the path with the pass (both forced on two identical actors)."""

import types

import pytest
import torch

from megacredit.utils.spawn import run_distributed

pytestmark = pytest.mark.distributed
VOCAB, TOP_K = 64, 5
TOPK = f"algorithm.sdpo.top_k={TOP_K}"
LAM = "algorithm.rlsd.lam.kind=constant"
CASES = {
    "grpo": [],
    "sdpo": [TOPK],
    "sdpo_student_set": [TOPK, "algorithm.sdpo.topk_source=student"],
    "credit": [TOPK, "algorithm.credit.num_contrastive=1"],
    "credit_student_set": [TOPK, "algorithm.sdpo.topk_source=student", "algorithm.credit.num_contrastive=1"],
    "rlsd": [LAM],
    "credit_rlsd": [LAM, "algorithm.credit.num_contrastive=1"],
}


def _run_case(name, overrides, old_policy_from_training, policy_state, teacher_tensors):
    from megacredit.megatron.distributed import current_context
    from megacredit.trainer.builder import ModelSource, build_actor
    from megacredit.config import load_config
    from megacredit.trainer.rl_step import passes_and_update
    from megacredit.trainer.run import RLRun
    from megacredit.trainer.rollout import RolloutBatch
    from megacredit.models.tiny import tiny_config
    from megatron_test_helpers import random_sample_sequences

    method = name.split("_student_set")[0]
    cfg = load_config(None, [
        f"algorithm.name={method}", "algorithm.group_size=2",
        "data.prompts_per_step=2", "training.ppo_mini_batch_size=2", "parallel.micro_batch_tokens=64",
        "rollout.max_seq_len=32", "rollout.max_new_tokens=8", "model.name_or_path=tiny", "optimizer.lr=1e-3",
        *overrides], check_paths=False)
    hf_config = tiny_config("qwen2", vocab_size=VOCAB)
    actor = build_actor(cfg, current_context(), ModelSource(hf_config, types.SimpleNamespace(pad_token_id=0),
                                                            policy_state))
    if actor.teacher is not None:
        actor.teacher.load_state_tensors(teacher_tensors)
    batch = RolloutBatch(records=[{}] * 4, group_ids=[0, 0, 1, 1], prompt_ids=[[]] * 4, response_ids=[[]] * 4,
                         response_texts=[""] * 4, finish_reasons=["stop"] * 4, rewards=[1.0, 0.0, 0.0, 1.0],
                         feedbacks=[""] * 4)
    run = RLRun(cfg, current_context(), actor, None, None, None, hf_config)
    samples = random_sample_sequences(torch.Generator().manual_seed(5), VOCAB, without_signal=(3,))
    passes = passes_and_update(run, 0, batch, samples, old_policy_from_training)
    params = [p.detach().clone() for chunk in actor.model_chunks for p in chunk.parameters()]
    grads = [p.main_grad.detach().clone() for chunk in actor.model_chunks for p in chunk.parameters()]
    return {"passes": passes, "params": params, "grads": grads}


def _both_paths(rank, world_size):
    from transformers import AutoModelForCausalLM

    from megacredit.megatron.bridge import load_hf_weights
    from megacredit.megatron.distributed import initialize
    from megacredit.megatron.model_provider import build_gpt_model
    from megacredit.models.tiny import tiny_config

    ctx = initialize(1, 1, seed=0)
    hf_config = tiny_config("qwen2", vocab_size=VOCAB)
    torch.manual_seed(0)
    policy_state = AutoModelForCausalLM.from_config(hf_config).state_dict()
    torch.manual_seed(1)
    teacher_model = build_gpt_model(hf_config, ctx)  # a different teacher: non-vacuous distillation
    load_hf_weights([teacher_model], AutoModelForCausalLM.from_config(hf_config).state_dict(), hf_config, ctx)
    teacher_tensors = [p.detach() for p in teacher_model.parameters()]
    return {name: [_run_case(name, overrides, skip, policy_state, teacher_tensors) for skip in (False, True)]
            for name, overrides in CASES.items()}


def _assert_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def test_skipping_the_old_policy_pass_changes_nothing():
    (results,) = run_distributed(_both_paths, world_size=1)
    for name, (with_pass, skipped) in results.items():
        a, b = with_pass["passes"], skipped["passes"]
        for key in ("train/loss", "train/grad_norm"):
            assert b.train_parts[0][key] == pytest.approx(a.train_parts[0][key], rel=1e-5, abs=1e-7), (name, key)
        assert a.train_parts[0]["train/grad_norm"] > 0, name
        for index in a.student:
            _assert_close(b.student[index].sampled_logp, a.student[index].sampled_logp, f"{name} old logp")
            assert torch.equal(b.student[index].topk_ids, a.student[index].topk_ids), name
            _assert_close(b.student[index].topk_logp, a.student[index].topk_logp, f"{name} student top-K")
            if a.teacher:
                assert torch.equal(b.teacher[index].set_ids, a.teacher[index].set_ids), name
                for field in ("topk_logp", "sampled_logp", "contrastive_topk_logp", "contrastive_sampled_logp"):
                    _assert_close(getattr(b.teacher[index], field), getattr(a.teacher[index], field), f"{name} {field}")
            if a.advantages is not None:
                _assert_close(b.advantages[index], a.advantages[index], f"{name} advantages")
        assert b.advantage_sums.keys() == a.advantage_sums.keys(), name
        for key, (value, count) in a.advantage_sums.items():
            assert b.advantage_sums[key][0] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
        for got, want in zip(skipped["grads"], with_pass["grads"]):
            _assert_close(got, want, f"{name} gradient")
        for got, want in zip(skipped["params"], with_pass["params"]):
            _assert_close(got, want, f"{name} updated weights")


def test_predicate_skips_only_when_provably_redundant():
    from megacredit.trainer.rl_step import can_take_old_policy_from_training

    def cfg(epochs=1, rollout_is=None):
        algorithm = types.SimpleNamespace() if rollout_is is None else types.SimpleNamespace(rollout_is=rollout_is)
        return types.SimpleNamespace(training=types.SimpleNamespace(ppo_epochs=epochs), algorithm=algorithm)

    assert can_take_old_policy_from_training(cfg(), 1)
    assert can_take_old_policy_from_training(cfg(rollout_is="none"), 1)
    assert not can_take_old_policy_from_training(cfg(), 2)  # later mini-batches see updated weights
    assert not can_take_old_policy_from_training(cfg(epochs=2), 1)
    assert not can_take_old_policy_from_training(cfg(rollout_is="token"), 1)  # needs pi_old before training
