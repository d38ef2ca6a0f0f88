"""Schedules for mixing coefficients (RLSD's lambda of Algorithm 1 line 17).

RLSD section 5.1: "The hyperparameter lambda in our RLSD is initialized at 0.5 and linearly
decayed to 0 over the first 50 training steps". Section 4.1 explains the direction: lambda
interpolates between the uniform GRPO advantage (lambda = 0) and the evidence-reweighted one
(lambda = 1), "gradually shifting to the uniform advantage". So the teacher's influence is
strongest at the start and vanishes after 50 steps. ``LambdaSchedule.rlsd_paper_default()``
is exactly that; anything else (e.g. a constant lambda, or a ramp UP) is a config choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LambdaSchedule:
    """A scalar that depends on the optimizer step: constant, or linear from ``start`` to ``end``.

    ``value(step)`` for ``kind == "linear"``: ``start + (end - start) * min(step, steps) / steps``,
    i.e. ``start`` at step 0, ``end`` from step ``steps`` on (held constant afterwards).
    """

    kind: Literal["linear", "constant"] = "linear"
    """``linear`` (interpolate start -> end over ``steps``) or ``constant`` (always ``start``)."""
    start: float = 0.5
    """Value at step 0 (and the constant value when ``kind == "constant"``)."""
    end: float = 0.0
    """Value reached at step ``steps`` and kept afterwards (ignored for ``constant``)."""
    steps: int = 50
    """Number of optimizer steps of the linear ramp (> 0 for ``linear``)."""

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "constant"):
            raise ValueError(f"LambdaSchedule.kind must be 'linear' or 'constant', got {self.kind!r}")
        if self.kind == "linear" and self.steps <= 0:
            raise ValueError(f"LambdaSchedule.steps must be > 0 for a linear schedule, got {self.steps}")

    @classmethod
    def constant(cls, value: float) -> "LambdaSchedule":
        """Always ``value``."""
        return cls(kind="constant", start=value, end=value, steps=1)

    @classmethod
    def linear(cls, start: float, end: float, steps: int) -> "LambdaSchedule":
        """Linear from ``start`` (step 0) to ``end`` (step ``steps`` and later)."""
        return cls(kind="linear", start=start, end=end, steps=steps)

    @classmethod
    def rlsd_paper_default(cls) -> "LambdaSchedule":
        """RLSD section 5.1: lambda = 0.5 at step 0, linearly decayed to 0 over 50 steps."""
        return cls(kind="linear", start=0.5, end=0.0, steps=50)

    def value(self, step: int) -> float:
        """The scheduled value at optimizer step ``step`` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.kind == "constant":
            return float(self.start)
        progress = min(step, self.steps) / self.steps
        return float(self.start + (self.end - self.start) * progress)

    __call__ = value
