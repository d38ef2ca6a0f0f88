"""Skipping the old-policy forward (one mini-batch, one PPO epoch) changes nothing: for every
method, the loss, every gradient, the updated weights, the old-policy and teacher results and the
advantages equal those of the path with the pass (both forced on two identical actors). And the
forward is really skipped: the passes run through Megatron's schedule (as the actor reports them
to its progress reporter) and the model's forward calls are counted on both paths."""

import contextlib
import types

import pytest
import torch

from megacredit.utils.progress import ProgressReporter
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


class PassLog(ProgressReporter):
    """A progress reporter that records each pass the actor runs through Megatron's schedule
    (``run_packed_schedule`` reports it as a task) and how many micro-batches it ran forward."""

    def __init__(self):
        self.passes = []

    @contextlib.contextmanager
    def task(self, description, total, unit):
        entry = [description, 0]
        self.passes.append(entry)

        def advance(count=1):
            entry[1] += count

        yield advance


def _run_case(name, overrides, old_policy_from_training, policy_state, teacher_tensors):
    from megacredit.megatron.distributed import current_context
    from megacredit.trainer.builder import ModelSource, build_actor
    from megacredit.config import load_config
    from megacredit.trainer.rl_step import passes_and_update
    from megacredit.trainer.run import RLRun
    from megacredit.models.tiny import tiny_config
    from megatron_test_helpers import four_sample_batch, random_sample_sequences

    method = name.split("_student_set")[0]
    cfg = load_config(None, [
        f"algorithm.name={method}", "algorithm.group_size=2",
        "data.prompts_per_step=2", "training.ppo_mini_batch_size=2", "parallel.micro_batch_tokens=64",
        "rollout.max_seq_len=32", "rollout.max_new_tokens=8", "model.name_or_path=tiny", "optimizer.lr=1e-3",
        *overrides], check_paths=False)
    hf_config = tiny_config("qwen2", vocab_size=VOCAB)
    log = PassLog()
    actor = build_actor(cfg, current_context(), ModelSource(hf_config, types.SimpleNamespace(pad_token_id=0),
                                                            policy_state), progress=log)
    forwards = []
    for chunk in actor.model_chunks:  # what the schedule calls, once per micro-batch of every pass
        chunk.register_forward_hook(lambda *args: forwards.append(1))
    if actor.teacher is not None:
        actor.teacher.load_state_tensors(teacher_tensors)
    run = RLRun(cfg, current_context(), actor, None, None, None, hf_config)
    samples = random_sample_sequences(torch.Generator().manual_seed(5), VOCAB, without_signal=(3,))
    passes = passes_and_update(run, 0, four_sample_batch(), samples, old_policy_from_training)
    params = [p.detach().clone() for chunk in actor.model_chunks for p in chunk.parameters()]
    grads = [p.main_grad.detach().clone() for chunk in actor.model_chunks for p in chunk.parameters()]
    return {"passes": passes, "params": params, "grads": grads, "pass_log": log.passes, "forwards": len(forwards)}


def _both_paths(rank, world_size):
    from transformers import AutoModelForCausalLM

    from megacredit.megatron.distributed import initialize
    from megacredit.models.tiny import tiny_config
    from megatron_test_helpers import model_shards

    ctx = initialize(1, 1, seed=0)
    hf_config = tiny_config("qwen2", vocab_size=VOCAB)
    torch.manual_seed(0)
    policy_state = AutoModelForCausalLM.from_config(hf_config).state_dict()
    torch.manual_seed(1)
    # a different teacher: non-vacuous distillation
    teacher_tensors = model_shards(hf_config, AutoModelForCausalLM.from_config(hf_config).state_dict(), ctx)
    return {name: [_run_case(name, overrides, skip, policy_state, teacher_tensors) for skip in (False, True)]
            for name, overrides in CASES.items()}


def _assert_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def results():
    """Every case on both paths, in one process (about a minute on 2 cores)."""
    (both,) = run_distributed(_both_paths, world_size=1)
    return both


def test_skipping_the_old_policy_pass_changes_nothing(results):
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


def test_the_skipped_path_runs_no_old_policy_forward(results):
    for name, (with_pass, skipped) in results.items():
        old_policy = [count for description, count in with_pass["pass_log"] if description == "old-policy pass"]
        assert len(old_policy) == 1 and old_policy[0] > 0, (name, with_pass["pass_log"])
        assert all(description != "old-policy pass" for description, _ in skipped["pass_log"]), name
        others = [entry for entry in with_pass["pass_log"] if entry[0] != "old-policy pass"]
        assert skipped["pass_log"] == others, name  # teacher and train passes: the same micro-batches
        assert with_pass["forwards"] - skipped["forwards"] == old_policy[0], name
        assert skipped["forwards"] == sum(count for _, count in skipped["pass_log"]), name


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
