"""ArithmeticEnv, its problem generator and the make_env registry."""

import pytest

from megacredit.envs import make_env, valid_env_names
from megacredit.envs.arithmetic import (
    ArithmeticDifficulty,
    ArithmeticEnv,
    generate_arithmetic_dataset,
    parse_integer_answer,
)


def test_generator_is_seeded_and_respects_difficulty():
    first = generate_arithmetic_dataset(50, seed=3, difficulty="2d+1d")
    assert first == generate_arithmetic_dataset(50, seed=3, difficulty="2d+1d")
    assert first != generate_arithmetic_dataset(50, seed=4, difficulty="2d+1d")
    for record in first:
        left, op, right = record["expression"].split()
        assert op == "+" and 10 <= int(left) <= 99 and 0 <= int(right) <= 9
        assert record["answer"] == int(left) + int(right)  # independent recomputation
        assert record["reference_answer"] == str(record["answer"])
        assert record["prompt"] == f"What is {record['expression']}? Answer with just the number."
    mixed = generate_arithmetic_dataset(200, seed=0, difficulty={"operand_digits": [2, 1], "operators": ["-"]})
    assert all(r["answer"] >= 0 for r in mixed)  # negative results re-drawn by default
    assert all(r["answer"] == int(r["expression"].split()[0]) - int(r["expression"].split()[2]) for r in mixed)


def test_difficulty_validation_messages():
    with pytest.raises(ValueError, match="operators"):
        ArithmeticDifficulty((1, 1), ("/",))
    with pytest.raises(ValueError, match="valid presets"):
        generate_arithmetic_dataset(1, 0, "impossible")


@pytest.mark.parametrize(
    "text, value",
    [("<answer>42</answer>", 42), ("3 + 9 = 12.", 12), ("<answer>7</answer> then 9", 7), ("-5", -5), ("12.5", None), ("", None)],
)
def test_parse_integer_answer(text, value):
    assert parse_integer_answer(text) == value


def test_rewards_and_feedback():
    env = ArithmeticEnv()
    record = {"answer": 42}
    assert env.evaluate(record, "<answer>42</answer>").reward == 1.0
    wrong = env.evaluate(record, "<answer>41</answer>")
    assert wrong.reward == 0.0 and wrong.feedback == "The correct answer is 42."
    assert env.evaluate(record, "The result is 42").reward == 1.0  # last-integer fallback
    assert ArithmeticEnv(require_answer_tags=True).evaluate(record, "The result is 42").reward == 0.0
    assert env.evaluate(record, "no idea").reward == 0.0  # malformed
    empty = env.evaluate(record, "")
    assert empty.reward == 0.0 and empty.feedback == "The correct answer is 42."
    # No feedback on a correct answer unless asked (as lasgroup/SDPO's math environment).
    assert env.evaluate(record, "<answer>42</answer>").feedback == ""
    assert ArithmeticEnv(feedback_on_correct=True).evaluate(record, "<answer>42</answer>").feedback == "The correct answer is 42."


@pytest.mark.parametrize("response, start", [("The answer is 11.", 14), ("<answer> 12</answer>", 9),
                                             ("3 + 9 = 12, so 12", 15), ("no idea", None)])
def test_answer_location_points_at_the_parsed_answer(response, start):
    location = ArithmeticEnv().answer_location({"answer": 12}, response)
    assert (location.start if location else None) == start
    if location:
        assert parse_integer_answer(response[location.start:]) == parse_integer_answer(response)
        assert location.correct_answer == "12"


def test_registry():
    assert isinstance(make_env("arithmetic", require_answer_tags=True), ArithmeticEnv)
    assert {"arithmetic", "multiple_choice", "tool_call", "code"} <= set(valid_env_names())
    with pytest.raises(ValueError, match="valid names: .*arithmetic"):
        make_env("chess")
    with pytest.raises(TypeError, match="bad keyword"):
        make_env("arithmetic", temperature=3)
