"""The teacher diagnostic (megacredit/trainer/teacher_diagnostic.py) against transformers.

A tiny random Qwen2 policy and a different teacher, the real SmolLM2 tokenizer and the arithmetic
environment: the teacher's and the student's probability of the correct answer at each
response's answer position, as the trainer reports them (Megatron forwards, teacher weights
swapped in, at the rollout temperature), equal the same probabilities computed directly from the
two transformers models on the probe texts (tolerance 1e-5, fp32).
"""

import math
import types

import pytest
import torch

from megacredit.utils.spawn import run_distributed

pytestmark = pytest.mark.distributed
TEMPERATURE = 0.8
RESPONSES = ["The answer is 5.", "<answer>13</answer>", "I do not know", "3 + 4 = 8"]


def _direct_probability(model, prompt_ids, text, answer_start, tokenizer):
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = prompt_ids + list(encoded["input_ids"])
    answer = sum(1 for _, end in encoded["offset_mapping"] if end > answer_start)
    with torch.no_grad():
        logp = (model(torch.tensor([ids])).logits[0, :-1] / TEMPERATURE).log_softmax(-1)
    picked = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return math.exp(float(picked[-answer:].sum()))


def _diagnostic(rank, world_size):
    from transformers import AutoModelForCausalLM

    from megacredit.config import load_config
    from megacredit.data.teacher_context import build_teacher_contexts
    from megacredit.envs.arithmetic import ArithmeticEnv, generate_arithmetic_dataset
    from megacredit.megatron.bridge import load_hf_weights
    from megacredit.megatron.distributed import initialize
    from megacredit.megatron.model_provider import build_gpt_model
    from megacredit.models.tiny import tiny_config
    from megacredit.trainer.builder import ModelSource, build_actor, load_tokenizer
    from megacredit.trainer.rl_step import teacher_context_config
    from megacredit.trainer.rollout import RolloutBatch
    from megacredit.trainer.run import RLRun
    from megacredit.trainer.teacher_diagnostic import answer_probability_sums

    ctx = initialize(1, 1, seed=0)
    tokenizer = load_tokenizer("smollm2-135m-instruct", "~/.cache/megacredit")
    hf_config = tiny_config("qwen2", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(hf_config).eval()
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(hf_config).eval()
    cfg = load_config(None, ["algorithm.name=sdpo", "model.name_or_path=tiny", "rollout.max_seq_len=256",
                             "rollout.max_new_tokens=16", "parallel.micro_batch_tokens=512",
                             f"rollout.temperature={TEMPERATURE}", "logging.teacher_diagnostic_samples=8"],
                      check_paths=False)
    actor = build_actor(cfg, ctx, ModelSource(hf_config, tokenizer, policy.state_dict()))
    teacher_megatron = build_gpt_model(hf_config, ctx)
    load_hf_weights([teacher_megatron], teacher.state_dict(), hf_config, ctx)
    actor.teacher.load_state_tensors([p.detach() for p in teacher_megatron.parameters()])

    env = ArithmeticEnv()
    records = [r for r in generate_arithmetic_dataset(2, seed=3) for _ in range(2)]
    results = [env.evaluate(r, text) for r, text in zip(records, RESPONSES)]
    batch = RolloutBatch(records, [0, 0, 1, 1], [[]] * 4, [tokenizer(t, add_special_tokens=False)["input_ids"]
                                                          for t in RESPONSES],
                         RESPONSES, ["stop"] * 4, [r.reward for r in results], [r.feedback for r in results])
    samples = build_teacher_contexts(tokenizer, batch.records, batch.group_ids, batch.response_ids, batch.rewards,
                                     batch.feedbacks, teacher_context_config(cfg), response_texts=RESPONSES)
    run = RLRun(cfg, ctx, actor, None, env, tokenizer, hf_config)
    sums = answer_probability_sums(run, batch, samples)
    expected = {"student": [], "teacher": []}
    for index, (record, text, sample) in enumerate(zip(records, RESPONSES, samples)):
        location = env.answer_location(record, text)
        if location is None or not sample.has_teacher_signal:
            continue
        probe = text[: location.start] + location.correct_answer
        for name, model, ids in (("student", policy, sample.student_ids), ("teacher", teacher, sample.teacher_ids)):
            prompt = ids[: len(ids) - sample.response_length]
            expected[name].append(_direct_probability(model, prompt, probe, location.start, tokenizer))
    return sums, expected, [s.has_teacher_signal for s in samples]


def test_answer_probabilities_equal_transformers():
    ((sums, expected, has_signal),) = run_distributed(_diagnostic, world_size=1, timeout=900)
    probed = len(expected["student"])
    assert probed == sum(has_signal[i] for i in (0, 1, 3)) >= 2  # "I do not know" states no answer
    for name in ("student", "teacher"):
        value, count = sums[f"teacher/answer_prob_{name}"]
        assert count == probed
        # Random tiny models give probabilities ~1e-10: compare relatively (fp32 sums of ~3 log-probs).
        assert value / count == pytest.approx(sum(expected[name]) / probed, rel=1e-4, abs=0)
    gain, _ = sums["teacher/answer_prob_gain"]
    difference = sum(expected["teacher"]) - sum(expected["student"])
    assert gain == pytest.approx(difference, rel=1e-3, abs=0)
    assert abs(difference) > 0.05 * max(sum(expected["teacher"]), sum(expected["student"]))  # not vacuous
