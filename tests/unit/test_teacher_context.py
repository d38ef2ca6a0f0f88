"""Self-teacher and CREDIT contrastive token sequences, with the real SmolLM2 tokenizer."""

import os

import pytest

from megacredit.data import TeacherContextConfig, build_teacher_contexts, encode_student_prompt, load_benchmark
from megacredit.data.teacher_context import split_think_trace
from megacredit.data.templates import student_messages
from megacredit.envs.arithmetic import generate_arithmetic_dataset

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _joint_prompt_ids(tokenizer, record):
    out = tokenizer.apply_chat_template(student_messages(record), tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_segmented_student_prompt_equals_joint_chat_template(smollm2_tokenizer):
    records = (
        generate_arithmetic_dataset(3, seed=0, difficulty="2d+1d")
        + load_benchmark("sciknoweval", os.path.join(FIXTURES, "sciknoweval_l3.jsonl")).records
        + load_benchmark("toolalpaca", os.path.join(FIXTURES, "toolalpaca_train.json")).records
        + load_benchmark("livecodebench", os.path.join(FIXTURES, "livecodebench_v6.jsonl")).records
    )
    for record in records:
        assert encode_student_prompt(smollm2_tokenizer, record) == _joint_prompt_ids(smollm2_tokenizer, record)


def _batch(tokenizer):
    """3 prompts x group of 3. Group 0: two successes; group 1: none; group 2: only sample 6."""
    records = generate_arithmetic_dataset(3, seed=1, difficulty="1d+1d")
    texts, rewards, feedbacks, samples = [], [], [], []
    outcome = [[1, 0, 1], [0, 0, 0], [1, 0, 0]]
    for group, record in enumerate(records):
        for member in range(3):
            ok = outcome[group][member]
            value = record["answer"] if ok else record["answer"] + 1 + member
            texts.append(f"<think>add them</think>The sum is <answer>{value}</answer> (g{group}m{member})")
            rewards.append(float(ok))
            feedbacks.append(f"The correct answer is {record['answer']}.")
            samples.append(record)
    response_ids = [_ids(tokenizer, t) for t in texts]
    return samples, [i // 3 for i in range(9)], response_ids, rewards, feedbacks, texts


def test_teacher_and_contrastive_sequences(smollm2_tokenizer):
    tok = smollm2_tokenizer
    records, groups, response_ids, rewards, feedbacks, texts = _batch(tok)
    config = TeacherContextConfig(num_contrastive=2)
    samples = build_teacher_contexts(tok, records, groups, response_ids, rewards, feedbacks, config, seed=7)
    for i, sample in enumerate(samples):
        length = len(response_ids[i])
        # same response tokens, unchanged, at the end of every sequence
        assert sample.response_length == length
        assert sample.student_ids[-length:] == response_ids[i] == sample.teacher_ids[-length:]
        assert sample.student_ids[:-length] == encode_student_prompt(tok, records[i])
        x_start, x_end = sample.teacher_x_span
        for ids, (cx_start, cx_end), source in zip(sample.contrastive_ids, sample.contrastive_x_spans, sample.contrastive_source_indices):
            assert ids[-length:] == response_ids[i]
            assert cx_start == x_start and ids[:x_start] == sample.teacher_ids[:x_start]  # chat head identical
            assert ids[cx_end:] == sample.teacher_ids[x_end:]  # solution + feedback + instruction + response identical
            assert ids[cx_start:cx_end] != sample.teacher_ids[x_start:x_end]  # only x differs
            assert records[source]["id"] != records[i]["id"]  # never the sample's own prompt
            assert tok.decode(ids[cx_start:cx_end]) == records[source]["prompt"]
        assert len(set(map(str, sample.contrastive_source_indices))) == 2  # C=2 distinct other prompts
    # sibling solution: a success of the same group, never the sample itself
    assert [s.sibling_index for s in samples] == [2, 0, 0, None, None, None, None, 6, 6]
    # the group without successes gets a feedback-only context
    teacher_text = tok.decode(samples[4].teacher_ids[: -samples[4].response_length])
    assert "Correct solution:" not in teacher_text and f"The correct answer is {records[4]['answer']}." in teacher_text
    assert all(s.has_teacher_signal for s in samples)


def test_teacher_prompt_matches_appendix_layout(smollm2_tokenizer):
    """Independent rendering: the chat template applied to the appendix A.1 text written out here
    (the appendix shows a solution AND the feedback: feedback_only_without_solution=False)."""
    tok = smollm2_tokenizer
    records, groups, response_ids, rewards, feedbacks, texts = _batch(tok)
    config = TeacherContextConfig(feedback_only_without_solution=False)
    samples = build_teacher_contexts(tok, records, groups, response_ids, rewards, feedbacks, config, seed=0)
    sibling_solution = texts[0].split("</think>")[1]  # first success of the group; think trace removed
    expected_user = (
        f"{records[1]['prompt']}\n\nCorrect solution:\n{sibling_solution}\n\n"
        f"The correct answer is {records[1]['answer']}.\n\nNow answer the question again, with just the number."
    )  # the arithmetic task's re-solve instruction (templates.RESOLVE_INSTRUCTIONS)
    expected = tok.apply_chat_template([{"role": "user", "content": expected_user}], tokenize=False, add_generation_prompt=True)
    prompt_ids = samples[1].teacher_ids[: -samples[1].response_length]
    assert tok.decode(prompt_ids) == expected
    start, end = samples[1].teacher_privileged_span
    assert tok.decode(prompt_ids[start:end]) == expected_user[len(records[1]["prompt"]):]


def test_paper_tasks_keep_the_appendix_resolve_instruction():
    from megacredit.data.templates import teacher_privileged_text

    for task in ("code", "sciknoweval", "toolalpaca"):
        assert teacher_privileged_text(task, None, "z").endswith("\n\nNow solve this problem step by step.")
    assert teacher_privileged_text("arithmetic", None, "z").endswith("\n\nNow answer the question again, with just the number.")


def test_no_signal_without_solution_or_feedback(smollm2_tokenizer):
    tok = smollm2_tokenizer
    records, groups, response_ids, _, _, _ = _batch(tok)
    samples = build_teacher_contexts(tok, records, groups, response_ids, [0.0] * 9, [""] * 9, TeacherContextConfig())
    assert not any(s.has_teacher_signal for s in samples)
    assert all(s.teacher_ids == s.student_ids and s.sibling_index is None for s in samples)


def test_contrastive_draw_is_seeded_and_needs_two_prompts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    records, groups, response_ids, rewards, feedbacks, _ = _batch(tok)
    config = TeacherContextConfig(num_contrastive=1)
    draw = lambda seed: [s.contrastive_source_indices for s in build_teacher_contexts(tok, records, groups, response_ids, rewards, feedbacks, config, seed=seed)]  # noqa: E731
    assert draw(3) == draw(3)
    assert len({str(draw(seed)) for seed in range(6)}) > 1
    one_prompt = [records[0]] * 3
    with pytest.raises(ValueError, match="two distinct prompts"):
        build_teacher_contexts(tok, one_prompt, [0, 0, 0], response_ids[:3], rewards[:3], feedbacks[:3], config)


def test_rlsd_mode_holds_only_the_ground_truth(smollm2_tokenizer):
    tok = smollm2_tokenizer
    records, groups, response_ids, rewards, feedbacks, _ = _batch(tok)
    samples = build_teacher_contexts(tok, records, groups, response_ids, rewards, feedbacks, TeacherContextConfig(mode="rlsd"))
    for record, sample in zip(records, samples):
        text = tok.decode(sample.teacher_ids[: -sample.response_length])
        assert f"Correct answer: {record['answer']}" in text
        assert "Correct solution:" not in text and "The correct answer is" not in text
        assert sample.sibling_index is None and sample.has_teacher_signal
    with pytest.raises(ValueError, match="reference_answer"):
        build_teacher_contexts(tok, [{"id": "q", "prompt": "x"}], [0], [[1]], [1.0], [""], TeacherContextConfig(mode="rlsd"))


def test_think_trace_options(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert split_think_trace("<think>plan</think>code") == ("plan", "code")
    records, groups, response_ids, rewards, feedbacks, _ = _batch(tok)
    for content, present, absent in [("solution", "The sum is", "add them"), ("think_and_solution", "<think>add them</think>", None), ("think", "add them", "The sum is <answer>")]:
        config = TeacherContextConfig(solution_content=content)
        sample = build_teacher_contexts(tok, records, groups, response_ids, rewards, feedbacks, config)[1]
        start, end = sample.teacher_privileged_span
        privileged = tok.decode(sample.teacher_ids[start:end])
        assert present in privileged and (absent is None or absent not in privileged)


def _env_feedbacks(records, rewards):
    """What the arithmetic environment gives by default: feedback only on a wrong answer."""
    return ["" if reward else f"The correct answer is {record['answer']}." for record, reward in zip(records, rewards)]


@pytest.mark.parametrize("feedback_only_without_solution", [True, False])
def test_sdpo_feedback_rules_decide_which_samples_are_distilled(smollm2_tokenizer, feedback_only_without_solution):
    """Groups [[1,0,1], [0,0,0], [1,0,0]] with feedback on wrong answers only (lasgroup/SDPO's
    math environment). Sample 6 is the only success of its group and has no feedback: no teacher
    signal (masked from the loss, its teacher forwards skipped); never its own solution."""
    tok = smollm2_tokenizer
    records, groups, response_ids, rewards, _, texts = _batch(tok)
    feedbacks = _env_feedbacks(records, rewards)
    config = TeacherContextConfig(feedback_only_without_solution=feedback_only_without_solution)
    samples = build_teacher_contexts(tok, records, groups, response_ids, rewards, feedbacks, config, seed=0)
    assert [s.has_teacher_signal for s in samples] == [True] * 6 + [False, True, True]
    assert [s.sibling_index for s in samples] == [2, 0, 0, None, None, None, None, 6, 6]
    has_feedback = ["The correct answer is" in tok.decode(s.teacher_ids[: -s.response_length]) for s in samples]
    wrong_with_solution = {1, 7, 8}
    expected = [i in {3, 4, 5} or (not feedback_only_without_solution and i in wrong_with_solution) for i in range(9)]
    assert has_feedback == expected
    no_signal = samples[6]
    assert no_signal.teacher_ids == no_signal.student_ids  # the bare prompt: nothing privileged


def test_sdpo_template_matches_the_public_sdpo_wording(smollm2_tokenizer):
    """The user turn with template='sdpo', written out from lasgroup/SDPO's actor.yaml templates:
    reprompt "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.",
    solution "\nCorrect solution:\n\n{...}\n", feedback "\nThe following is feedback from your
    unsuccessful earlier attempt:\n\n{...}\n"."""
    tok = smollm2_tokenizer
    records, groups, response_ids, rewards, _, texts = _batch(tok)
    feedbacks = _env_feedbacks(records, rewards)
    config = TeacherContextConfig(template="sdpo", feedback_only_without_solution=False)
    samples = build_teacher_contexts(tok, records, groups, response_ids, rewards, feedbacks, config, seed=0)
    solution = texts[0].split("</think>")[1]
    expected_user = (f"{records[1]['prompt']}\nCorrect solution:\n\n{solution}\n"
                     f"\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
                     f"The correct answer is {records[1]['answer']}.\n\n\nCorrectly solve the original question.")
    expected = tok.apply_chat_template([{"role": "user", "content": expected_user}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(samples[1].teacher_ids[: -samples[1].response_length]) == expected
