"""Multiple-choice environment (SciKnowEval-style), CREDIT appendix A.1.

The student is asked (system prompt of the SciKnowEval template, see
:mod:`megacredit.data.templates`) to answer in ``<reasoning>...</reasoning> <answer>X</answer>``
form. The reward is an exact match of the parsed letter with the record's ``answer``; the
feedback z for the self-teacher is the ground truth, exactly as the appendix shows it::

    Correct answer: B
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from megacredit.envs.base import AnswerLocation, EnvResult, Environment, Split

DEFAULT_CHOICE_LABELS: tuple[str, ...] = ("A", "B", "C", "D")

# Patterns tried in order; the LAST occurrence of the first pattern family that matches wins.
# 1. <answer> X </answer> (the requested format; tolerant to whitespace and "(X)" / "X:" / "X.")
_TAGGED = re.compile(r"<answer>\s*\(?\s*([A-Za-z])\s*\)?\s*[.:]?\s*</answer>", re.IGNORECASE)
# 2. lenient variants: "Answer: X", "the answer is (X)", "answer is option X", "Answer = **X**".
#    The letter must be upper case here so that prose like "answer a question" never counts.
_LENIENT = re.compile(r"(?i:answer)(?:\s+(?i:is))?(?:\s*[:=\-])?\s*(?:(?i:option)\s+)?[\(\[\*]*\s*([A-Z])(?![A-Za-z])")


def parse_choice(response: str, labels: Sequence[str] = DEFAULT_CHOICE_LABELS) -> str | None:
    """Return the chosen option letter (upper case) or None when no valid letter is found.

    ``<answer>X</answer>`` takes precedence over the lenient forms; within a form the last
    occurrence wins (a model may restate the options before its final choice). Letters that
    are not among ``labels`` are ignored.
    """
    valid = {label.upper() for label in labels}
    for pattern in (_TAGGED, _LENIENT):
        letters = [m.group(1).upper() for m in pattern.finditer(response)]
        letters = [letter for letter in letters if letter in valid]
        if letters:
            return letters[-1]
    return None


def correct_answer_feedback(answer: str) -> str:
    """The feedback z of appendix A.1 for SciKnowEval: ``Correct answer: X``."""
    return f"Correct answer: {answer}"


class MultipleChoiceEnv(Environment):
    """Exact-letter-match reward on ``record['answer']`` with ``Correct answer: X`` feedback.

    Record fields used: ``answer`` (the correct letter, required) and ``choice_labels``
    (optional list of valid letters, default A-D).
    """

    name = "multiple_choice"

    def __init__(self, feedback_on_correct: bool = True) -> None:
        # feedback_on_correct: also give "Correct answer: X" when the response was right
        # (the ground truth is then consistent evidence for the self-teacher).
        self.feedback_on_correct = feedback_on_correct

    def evaluate(self, record: dict[str, Any], response: str, split: Split = "train") -> EnvResult:
        if "answer" not in record or not isinstance(record["answer"], str) or not record["answer"]:
            raise KeyError(
                "MultipleChoiceEnv needs record['answer'] = the correct option letter (e.g. 'B'); "
                f"got record keys {sorted(record)}"
            )
        answer = record["answer"].strip().upper()
        labels = record.get("choice_labels") or DEFAULT_CHOICE_LABELS
        predicted = parse_choice(response or "", labels)
        correct = predicted == answer
        feedback = correct_answer_feedback(answer) if (not correct or self.feedback_on_correct) else ""
        return EnvResult(
            reward=1.0 if correct else 0.0,
            feedback=feedback,
            details={"predicted": predicted, "answer": answer, "format_ok": predicted is not None},
        )

    def answer_location(self, record: dict[str, Any], response: str) -> AnswerLocation | None:
        """Where the response states its letter (the match :func:`parse_choice` reads), and the correct one."""
        labels = {label.upper() for label in (record.get("choice_labels") or DEFAULT_CHOICE_LABELS)}
        for pattern in (_TAGGED, _LENIENT):
            matches = [m for m in pattern.finditer(response or "") if m.group(1).upper() in labels]
            if matches:
                return AnswerLocation(start=matches[-1].start(1), correct_answer=str(record["answer"]).strip().upper())
        return None
