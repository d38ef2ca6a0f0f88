"""MultipleChoiceEnv: parsing variants, reward, the appendix A.1 feedback string."""

import pytest

from megacredit.envs import make_env
from megacredit.envs.multiple_choice import MultipleChoiceEnv, parse_choice

RECORD = {"answer": "B", "choice_labels": ["A", "B", "C", "D"]}


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<reasoning>methylation</reasoning>\n<answer>\nB\n</answer>", "B"),
        ("<answer>(c)</answer>", "C"),
        ("Answer: D", "D"),
        ("so the answer is (A).", "A"),
        ("The answer is **C**.", "C"),
        ("answer is option B", "B"),
        ("I will answer a question first. Answer: C", "C"),  # lower-case prose "a" is not a choice
        ("<answer>A</answer> wait, no: <answer>D</answer>", "D"),  # last occurrence wins
        ("Answer: C ... final <answer>B</answer>", "B"),  # the tag beats the lenient form
        ("<answer>E</answer>", None),  # not a valid label
        ("", None),
        ("I am not sure.", None),
    ],
)
def test_parse_choice(response, expected):
    assert parse_choice(response, ["A", "B", "C", "D"]) == expected


def test_correct_wrong_malformed_empty():
    env = MultipleChoiceEnv()
    correct = env.evaluate(RECORD, "<reasoning>x</reasoning><answer>B</answer>")
    wrong = env.evaluate(RECORD, "<reasoning>x</reasoning><answer>A</answer>")
    malformed = env.evaluate(RECORD, "<answer>maybe</answer>")
    empty = env.evaluate(RECORD, "")
    assert (correct.reward, wrong.reward, malformed.reward, empty.reward) == (1.0, 0.0, 0.0, 0.0)
    for result in (correct, wrong, malformed, empty):
        assert result.feedback == "Correct answer: B"  # appendix A.1, SciKnowEval
    assert wrong.details["predicted"] == "A" and malformed.details["format_ok"] is False


def test_no_feedback_on_correct_option_and_two_choice_labels():
    env = MultipleChoiceEnv(feedback_on_correct=False)
    assert env.evaluate(RECORD, "<answer>B</answer>").feedback == ""
    two = {"answer": "A", "choice_labels": ["A", "B"]}
    assert env.evaluate(two, "<answer>C</answer>").details["predicted"] is None


def test_missing_answer_field_is_a_clear_error():
    with pytest.raises(KeyError, match="record\\['answer'\\]"):
        MultipleChoiceEnv().evaluate({"prompt": "q"}, "<answer>A</answer>")


def test_batch_matches_single_and_registry_alias():
    env = make_env("sciknoweval")
    responses = ["<answer>B</answer>", "<answer>C</answer>", "", "Answer: B"]
    batch = env.evaluate_batch([RECORD] * 4, responses, max_workers=2)
    assert [r.reward for r in batch] == [env.evaluate(RECORD, y).reward for y in responses] == [1.0, 0.0, 0.0, 1.0]
