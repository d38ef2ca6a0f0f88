"""Golden test of the Megatron actor against Hugging Face transformers.

The actor's old-policy pass, teacher + contrastive passes (teacher weights swapped into the
policy's modules) and its CREDIT training loss on packed micro-batches are compared with the
same quantities computed directly from two transformers models (policy and teacher) on each
sequence alone, with full-vocabulary log_softmax(logits / T) and plain indexing, at T = 1 and at a
rollout temperature T = 0.7 (every pass scores the tempered distribution that was sampled, as verl
does). Tolerance 1e-5 (fp32). A sample without a teacher signal is not run through the teacher
passes (skip_without_signal) and the loss is unchanged.
"""

import types

import pytest
import torch

from megacredit.utils.spawn import run_distributed

pytestmark = pytest.mark.distributed
VOCAB, TOP_K, LAM = 64, 5, 0.3


def _hf_logp(model, ids, response_length, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return (logits[len(ids) - response_length - 1: len(ids) - 1] / temperature).log_softmax(-1)


def _expected(policy, teacher, samples, temperature):
    from megacredit.algorithms.credit import credit_loss
    from megacredit.algorithms.objective import pad_per_sample, response_mask

    rows = {"student": [], "teacher": [], "contrastive": [], "ids": [], "sampled": []}
    for sample in samples.values():
        response = torch.tensor(sample.student_ids[-sample.response_length:])
        student_logp = _hf_logp(policy, sample.student_ids, sample.response_length, temperature)
        teacher_logp = _hf_logp(teacher, sample.teacher_ids, sample.response_length, temperature)
        contrastive_logp = _hf_logp(teacher, sample.contrastive_ids[0], sample.response_length, temperature)
        ids = teacher_logp.topk(TOP_K, dim=-1).indices
        rows["ids"].append(ids)
        rows["student"].append(student_logp.gather(1, ids))
        rows["teacher"].append(teacher_logp.gather(1, ids))
        rows["contrastive"].append(contrastive_logp.gather(1, ids))
        rows["sampled"].append(student_logp.gather(1, response[:, None])[:, 0])
    mask = response_mask([s.response_length for s in samples.values()])
    out = credit_loss(pad_per_sample(rows["student"]), pad_per_sample(rows["teacher"]),
                      pad_per_sample(rows["contrastive"])[None], mask, torch.ones(len(samples), dtype=torch.bool),
                      lam=LAM, alpha=1.0, tail=True)
    loss = (out.per_token_loss * out.loss_mask).sum() / out.loss_mask.sum()
    return float(loss), rows


def _golden(rank, world_size, temperature):
    from transformers import AutoModelForCausalLM

    from megacredit.megatron.bridge import load_hf_weights
    from megacredit.megatron.distributed import initialize
    from megacredit.megatron.model_provider import build_gpt_model
    from megacredit.models.tiny import tiny_config
    from megacredit.trainer.builder import ModelSource, build_actor
    from megacredit.config import load_config

    ctx = initialize(1, 1, seed=0)
    hf_config = tiny_config("qwen2", vocab_size=VOCAB)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(hf_config).eval()
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(hf_config).eval()
    cfg = load_config(None, [
        "algorithm.name=credit", f"algorithm.sdpo.top_k={TOP_K}", f"algorithm.credit.lam={LAM}",
        "algorithm.sdpo.tail=true", "parallel.micro_batch_tokens=32", "rollout.max_seq_len=32",
        "rollout.max_new_tokens=8", "optimizer.clip_grad=0", "model.name_or_path=tiny",
        f"rollout.temperature={temperature}"], check_paths=False)
    actor = build_actor(cfg, ctx, ModelSource(hf_config, types.SimpleNamespace(pad_token_id=0), policy.state_dict()))
    teacher_megatron = build_gpt_model(hf_config, ctx)
    load_hf_weights([teacher_megatron], teacher.state_dict(), hf_config, ctx)
    actor.teacher.load_state_tensors([p.detach() for p in teacher_megatron.parameters()])

    from megatron_test_helpers import random_sample_sequences

    samples = random_sample_sequences(torch.Generator().manual_seed(5), VOCAB)
    student_results = actor.old_policy_pass(samples)
    teacher_results = actor.teacher_pass(samples, student_results)
    expected_loss, rows = _expected(policy, teacher, samples, temperature)
    skipped = _skip_without_signal(actor, samples, student_results, teacher_results)
    metrics = actor.train_mini_batch(sorted(samples), samples, student_results, teacher_results, None)
    return metrics["train/loss"], expected_loss, student_results, teacher_results, rows, skipped


def _skip_without_signal(actor, samples, student_results, teacher_results):
    """Sample 3 without a teacher signal: its teacher passes are skipped (the pass sees 3 samples'
    sequences, not 4) and the loss of a (non-updating) forward+backward is the same."""
    from megatron_test_helpers import random_sample_sequences

    unsignalled = random_sample_sequences(torch.Generator().manual_seed(5), VOCAB, without_signal=(3,))
    seen = []
    forward_only = actor._forward_only
    actor._forward_only = lambda groups, *args: seen.append(len(groups)) or forward_only(groups, *args)
    try:
        skipped = actor.teacher_pass(unsignalled, student_results, skip_without_signal=True)
        kept = actor.teacher_pass(unsignalled, student_results)
    finally:
        actor._forward_only = forward_only
    losses = [_loss_without_update(actor, unsignalled, student_results, teacher)[0] for teacher in (skipped, kept)]
    return {"sequences_seen": seen, "losses": losses, "placeholder": skipped[3]}


def _loss_without_update(actor, samples, student, teacher):
    optimizer_step = actor.optimizer.step
    actor.optimizer.step = lambda *a, **k: (True, 0.0, 0)  # measure the loss, leave the weights
    try:
        metrics = actor.train_mini_batch(sorted(samples), samples, student, teacher, None)
    finally:
        actor.optimizer.step = optimizer_step
    return metrics["train/loss"], metrics


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_actor_passes_and_loss_equal_transformers(temperature):
    ((loss, expected_loss, student, teacher, rows, skipped),) = run_distributed(
        _golden, world_size=1, temperature=temperature)
    for index in range(4):
        torch.testing.assert_close(student[index].sampled_logp, rows["sampled"][index], rtol=1e-5, atol=1e-5)
        assert torch.equal(teacher[index].set_ids, rows["ids"][index])
        torch.testing.assert_close(teacher[index].topk_logp, rows["teacher"][index], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(teacher[index].contrastive_topk_logp[0], rows["contrastive"][index],
                                   rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert expected_loss > 1e-3  # teacher and policy differ: the comparison is not vacuous
    assert skipped["sequences_seen"] == [3, 4]  # the unsignalled sample's forwards were skipped
    assert skipped["losses"][0] == pytest.approx(skipped["losses"][1], rel=1e-5, abs=1e-7)
    assert not skipped["placeholder"].topk_logp.any()
