"""The environment interface: a prompt record and a response in, reward and feedback out.

Self-distillation needs both a scalar reward (for GRPO/RLSD advantages and for choosing a
successful sibling as the teacher's solution) and the feedback string z that the self-teacher
is conditioned on (CREDIT section 4 and appendix A.1).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

Split = Literal["train", "val"]


@dataclass
class EnvResult:
    """The outcome of scoring one response."""

    reward: float
    """Reward in [0, 1]: 1.0 pass, 0.0 fail, or a partial score (e.g. fraction of tests passed)."""
    feedback: str
    """Feedback z for the self-teacher ("" when the environment has none to give)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Structured details for logging (per-test verdicts, parsed answer, ...)."""

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.reward) <= 1.0:
            raise ValueError(f"EnvResult.reward must lie in [0, 1], got {self.reward}")


@dataclass(frozen=True)
class AnswerLocation:
    """Where a response states its final answer, for the teacher diagnostic
    (megacredit/trainer/teacher_diagnostic.py): the probability of the correct answer there."""

    start: int
    """Character offset in the response where the stated answer begins."""
    correct_answer: str
    """The correct answer's text, as it would be written at ``start``."""


class Environment:
    """Base class. Subclasses implement :meth:`evaluate`; batches run on a bounded pool."""

    name: str = "base"

    def evaluate(self, record: dict[str, Any], response: str, split: Split = "train") -> EnvResult:
        """Score ``response`` to the prompt ``record``. ``split='val'`` uses all private tests."""
        raise NotImplementedError

    def answer_location(self, record: dict[str, Any], response: str) -> AnswerLocation | None:
        """Where ``response`` states its answer and what the correct one is; None when this
        environment cannot say (free-form tasks) or the response states none."""
        return None

    def evaluate_batch(
        self,
        records: Sequence[dict[str, Any]],
        responses: Sequence[str],
        split: Split = "train",
        max_workers: int = 2,
    ) -> list[EnvResult]:
        """Score many responses in parallel with at most ``max_workers`` concurrent evaluations."""
        if len(records) != len(responses):
            raise ValueError(f"evaluate_batch got {len(records)} records but {len(responses)} responses")
        if max_workers <= 1 or len(records) <= 1:
            return [self.evaluate(r, y, split) for r, y in zip(records, responses)]
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            return list(pool.map(lambda pair: self.evaluate(pair[0], pair[1], split), zip(records, responses)))
