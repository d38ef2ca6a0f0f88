"""Synthetic arithmetic environment: the CPU demo task (generated problems, answer feedback).

Problems are generated from a seed and a difficulty knob (:class:`ArithmeticDifficulty`:
digits per operand, number of operands, operators). The prompt asks for just the number
(see ARITHMETIC_INSTRUCTION); parsing takes ``<answer>N</answer>`` if present, else the last
integer in the response. Reward 1/0;
feedback is the ground truth, e.g. ``The correct answer is 42.``

SmolLM2-135M-Instruct gets about 12.5 % greedy on random 2-digit + 2-digit addition (facts
note), so the demo uses the easier presets (``"1d+1d"``: one-digit operands, ``"2d+1d"``: a
two-digit plus a one-digit number) where a 135M model has room to improve within minutes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from megacredit.envs.base import AnswerLocation, EnvResult, Environment, Split

ARITHMETIC_INSTRUCTION = "Answer with just the number."
"""Default format instruction appended to every question. Measured with SmolLM2-135M-Instruct
(greedy, 24 problems, 12 new tokens): this wording 46 % on "1d+1d" / 17 % on "2d+1d";
"Put the final number inside <answer></answer> tags." 42 % / 21 % (the model never emitted the
tags); adding "for example <answer>7</answer>" made it copy the 7 (34 % / 3 %). The parser reads
<answer> tags first and otherwise the last integer, so every wording stays parseable."""

_SUPPORTED_OPERATORS = ("+", "-", "*")


@dataclass(frozen=True)
class ArithmeticDifficulty:
    """The difficulty knob of the generated problems."""

    operand_digits: tuple[int, ...] = (1, 1)
    """Number of decimal digits of each operand, in order (len = number of operands)."""
    operators: tuple[str, ...] = ("+",)
    """Operators drawn uniformly between consecutive operands; subset of '+', '-', '*'."""
    allow_negative_results: bool = False
    """If False, subtraction problems are re-drawn until the result is >= 0."""

    def __post_init__(self) -> None:
        if len(self.operand_digits) < 2:
            raise ValueError(f"ArithmeticDifficulty.operand_digits needs >= 2 operands, got {self.operand_digits}")
        if any(d < 1 or d > 9 for d in self.operand_digits):
            raise ValueError(f"ArithmeticDifficulty.operand_digits must be in 1..9, got {self.operand_digits}")
        unknown = set(self.operators) - set(_SUPPORTED_OPERATORS)
        if not self.operators or unknown:
            raise ValueError(
                f"ArithmeticDifficulty.operators must be a non-empty subset of {_SUPPORTED_OPERATORS}, got {self.operators}"
            )


DIFFICULTY_PRESETS: dict[str, ArithmeticDifficulty] = {
    "1d+1d": ArithmeticDifficulty((1, 1), ("+",)),
    "2d+1d": ArithmeticDifficulty((2, 1), ("+",)),
    "2d+2d": ArithmeticDifficulty((2, 2), ("+",)),
    "2d+-1d": ArithmeticDifficulty((2, 1), ("+", "-")),
    "1d*1d": ArithmeticDifficulty((1, 1), ("*",)),
    "3d+3d": ArithmeticDifficulty((3, 3), ("+",)),
}
"""Named difficulties; ``"1d+1d"`` is the easiest, ``"2d+2d"`` matches the facts-note baseline."""


def resolve_difficulty(difficulty: str | ArithmeticDifficulty | dict) -> ArithmeticDifficulty:
    """Accept a preset name, an ArithmeticDifficulty, or a dict of its fields (from YAML)."""
    if isinstance(difficulty, ArithmeticDifficulty):
        return difficulty
    if isinstance(difficulty, dict):
        fields = dict(difficulty)
        for key in ("operand_digits", "operators"):
            if key in fields:
                fields[key] = tuple(fields[key])
        return ArithmeticDifficulty(**fields)
    if difficulty not in DIFFICULTY_PRESETS:
        raise ValueError(f"unknown arithmetic difficulty {difficulty!r}; valid presets: {sorted(DIFFICULTY_PRESETS)}")
    return DIFFICULTY_PRESETS[difficulty]


def _random_operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _evaluate_expression(operands: list[int], operators: list[str]) -> int:
    # Python's precedence (* before +/-) is the usual arithmetic convention.
    return int(eval(" ".join(_interleave(operands, operators)), {"__builtins__": {}}))  # noqa: S307 (digits/ops only)


def _interleave(operands: list[int], operators: list[str]) -> list[str]:
    parts = [str(operands[0])]
    for op, value in zip(operators, operands[1:]):
        parts += [op, str(value)]
    return parts


def make_arithmetic_problem(rng: random.Random, difficulty: ArithmeticDifficulty) -> tuple[str, int]:
    """Draw one expression (text like ``"23 + 5"``) and its integer value."""
    while True:
        operands = [_random_operand(rng, d) for d in difficulty.operand_digits]
        operators = [rng.choice(difficulty.operators) for _ in operands[1:]]
        value = _evaluate_expression(operands, operators)
        if difficulty.allow_negative_results or value >= 0:
            return " ".join(_interleave(operands, operators)), value


def arithmetic_prompt(expression: str, instruction: str = ARITHMETIC_INSTRUCTION) -> str:
    """The student's user turn for one problem."""
    return f"What is {expression}? {instruction}".rstrip()


def generate_arithmetic_dataset(
    num_problems: int,
    seed: int,
    difficulty: str | ArithmeticDifficulty | dict = "1d+1d",
    id_prefix: str = "arith",
    instruction: str = ARITHMETIC_INSTRUCTION,
) -> list[dict[str, Any]]:
    """Deterministic list of prompt records (same seed -> same problems).

    Each record: ``id``, ``task='arithmetic'``, ``prompt`` (user turn x), ``system`` (None),
    ``answer`` (int), ``reference_answer`` (str, for RLSD's answer-only teacher), ``expression``.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    level = resolve_difficulty(difficulty)
    rng = random.Random(seed)
    records = []
    for index in range(num_problems):
        expression, value = make_arithmetic_problem(rng, level)
        records.append(
            {
                "id": f"{id_prefix}-{seed}-{index}",
                "task": "arithmetic",
                "prompt": arithmetic_prompt(expression, instruction),
                "system": None,
                "answer": value,
                "reference_answer": str(value),
                "expression": expression,
            }
        )
    return records


_TAGGED = re.compile(r"<answer>\s*([-+]?\s*\d[\d,]*)\s*</answer>", re.IGNORECASE)
_INTEGER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?![\d,]|\.\d)")


def parse_integer_answer(response: str) -> int | None:
    """``<answer>N</answer>`` (last one) if present, else the last integer in the text, else None."""
    tagged = _TAGGED.findall(response)
    if tagged:
        return int(tagged[-1].replace(",", "").replace(" ", ""))
    integers = _INTEGER.findall(response)
    if integers:
        return int(integers[-1].replace(",", ""))
    return None


def arithmetic_feedback(answer: int) -> str:
    """Feedback z: the ground truth answer."""
    return f"The correct answer is {answer}."


class ArithmeticEnv(Environment):
    """Reward 1 iff the parsed integer equals ``record['answer']``."""

    name = "arithmetic"

    def __init__(self, feedback_on_correct: bool = False, require_answer_tags: bool = False) -> None:
        # feedback_on_correct: also give the ground truth when the response was right. Off by
        # default, as the public SDPO code's math environment (lasgroup/SDPO
        # verl/utils/reward_score/feedback/math.py: feedback only for a wrong format, a truncated
        # or, with correctness_feedback, a wrong answer).
        self.feedback_on_correct = feedback_on_correct
        # require_answer_tags: only accept <answer>N</answer> (no last-integer fallback).
        self.require_answer_tags = require_answer_tags

    def evaluate(self, record: dict[str, Any], response: str, split: Split = "train") -> EnvResult:
        if not isinstance(record.get("answer"), int):
            raise KeyError(f"ArithmeticEnv needs record['answer'] = int; got {record.get('answer')!r}")
        response = response or ""
        if self.require_answer_tags and not _TAGGED.search(response):
            predicted = None
        else:
            predicted = parse_integer_answer(response)
        correct = predicted == record["answer"]
        feedback = arithmetic_feedback(record["answer"]) if (not correct or self.feedback_on_correct) else ""
        return EnvResult(
            reward=1.0 if correct else 0.0,
            feedback=feedback,
            details={"predicted": predicted, "answer": record["answer"], "format_ok": bool(_TAGGED.search(response))},
        )

    def answer_location(self, record: dict[str, Any], response: str) -> AnswerLocation | None:
        """Where the response states its answer (the parsed integer), and the correct one."""
        response = response or ""
        tagged = list(_TAGGED.finditer(response))
        integers = [] if self.require_answer_tags else list(_INTEGER.finditer(response))
        if tagged:
            start = tagged[-1].start(1)
        elif integers:
            start = integers[-1].start()
        else:
            return None
        return AnswerLocation(start=start, correct_answer=str(record["answer"]))
