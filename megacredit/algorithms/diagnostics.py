"""Privileged-information leakage diagnostic (RLSD paper section 3.1, Figure 2 and Figure 3(a)).

RLSD observes that OPSD-trained models "systematically reference privileged information that is
unavailable at inference time", e.g. "Given that the **reference solution** uses 9 values ...
But wait, **the reference solution says "No"**" (Figure 2), and tracks the number of such
responses over training (Figure 3(a)). The paper does not publish its phrase list; the default
below (CHOICE) targets phrases that only make sense if the model believes it was shown a
solution, answer key, hint or feedback. Matching is case-insensitive on whitespace-normalised
text, by substring; a response counts once however many phrases it contains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

DEFAULT_LEAKAGE_PHRASES: tuple[str, ...] = (
    "reference solution",
    "reference answer",
    "the provided solution",
    "the given solution",
    "the solution provided",
    "the correct answer says",
    "the correct answer is given",
    "the answer key",
    "the ground truth",
    "ground-truth answer",
    "according to the hint",
    "the hint says",
    "according to the feedback",
    "the feedback says",
    "the expected output says",
    "as the solution shows",
    "the solution says",
    "the official solution",
)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass
class LeakageReport:
    """Leakage counts over a batch of responses."""

    leaking_responses: int
    """Number of responses containing at least one phrase."""
    total_responses: int
    """Number of responses inspected."""
    per_phrase: dict[str, int] = field(default_factory=dict)
    """Phrase -> number of responses containing it (a response may count for several)."""

    @property
    def rate(self) -> float:
        """leaking_responses / total_responses (0 for an empty batch)."""
        return self.leaking_responses / self.total_responses if self.total_responses else 0.0


def leakage_report(responses: Iterable[str], phrases: Sequence[str] = DEFAULT_LEAKAGE_PHRASES) -> LeakageReport:
    """Which responses refer to privileged information, and by which phrases."""
    if isinstance(phrases, str):
        raise TypeError("phrases must be a sequence of strings, not one string; wrap it in a tuple")
    needles = [(phrase, _normalise(phrase)) for phrase in phrases]
    if any(not needle for _, needle in needles):
        raise ValueError("phrases must not contain empty strings (they would match every response)")
    per_phrase = {phrase: 0 for phrase, _ in needles}
    leaking = total = 0
    for response in responses:
        if not isinstance(response, str):
            raise TypeError(f"responses must be strings (decoded text), got {type(response).__name__}")
        total += 1
        text = _normalise(response)
        hits = [phrase for phrase, needle in needles if needle in text]
        for phrase in hits:
            per_phrase[phrase] += 1
        leaking += bool(hits)
    return LeakageReport(leaking, total, per_phrase)


def count_privileged_leakage(responses: Iterable[str], phrases: Sequence[str] = DEFAULT_LEAKAGE_PHRASES) -> int:
    """Number of responses that refer to privileged information (RLSD paper section 3.1)."""
    return leakage_report(responses, phrases).leaking_responses
