"""Token-level student, self-teacher and CREDIT contrastive sequences for a rollout batch.

For each sample i (prompt record x_i, response ids y_i, reward R_i, feedback z_i):

- student:  prompt_ids(x_i) + y_i
- teacher:  prompt_ids(x_i + privileged_i) + y_i, with y_i UNCHANGED (CREDIT eq. 2 scores the
  same response tokens under the enriched context). privileged_i = a successful sibling's
  solution from the same group (never sample i itself) + z_i + the re-solve instruction
  (appendix A.1, see megacredit.data.templates), or in ``rlsd`` mode only the ground-truth
  answer (RLSD paper section 5: "RLSD requires only the final ground-truth answer").
- contrastive k = 1..C (CREDIT section 3.3, eq. 8, appendix A Table 3): the teacher context
  with x_i replaced by x'_k in the user-turn prefix, x'_k drawn uniformly from the OTHER
  distinct prompts of the batch; solution, z_i and y_i unchanged.

Prompts are tokenised piece by piece (head | x | privileged suffix | chat tail), so a
contrastive sequence differs from its teacher sequence only in the x tokens. All of a sample's
teacher-side sequences live in one :class:`SampleSequences`, so the trainer can place the
teacher and its C contrastive sequences in the same micro-batch (top-K alignment stays local).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from megacredit.data.templates import (
    encode_prompt_segments,
    rlsd_privileged_text,
    sdpo_privileged_text,
    teacher_privileged_text,
)

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass
class TeacherContextConfig:
    """How the self-teacher context is assembled."""

    mode: Literal["sdpo", "rlsd"] = "sdpo"
    """``sdpo`` (SDPO/CREDIT: sibling solution + feedback) or ``rlsd`` (ground-truth answer only)."""
    num_contrastive: int = 0
    """C, contrastive prompts per sample (CREDIT default 1; 0 for SDPO/RLSD)."""
    success_threshold: float = 1.0
    """A rollout with reward >= this counts as a successful solution for its siblings."""
    include_feedback: bool = True
    """Put the environment feedback z in the context."""
    feedback_only_without_solution: bool = True
    """Drop z when a sibling solution is present (SDPO's default)."""
    template: Literal["credit", "sdpo"] = "credit"
    """Wording: CREDIT appendix A.1's, or the public SDPO code's (data/templates.py)."""
    solution_content: Literal["solution", "think_and_solution", "think"] = "solution"
    """Which part of the sibling's text enters the context (CREDIT Fig. 6 context ablation):
    without the <think> trace (default), the full text, or only the think trace."""
    sibling_choice: Literal["first", "random"] = "first"
    """Which successful sibling to use when several exist (SDPO uses the first)."""

    def __post_init__(self) -> None:
        if self.mode not in ("sdpo", "rlsd"):
            raise ValueError(f"TeacherContextConfig.mode must be 'sdpo' or 'rlsd', got {self.mode!r}")
        if self.num_contrastive < 0:
            raise ValueError(f"TeacherContextConfig.num_contrastive must be >= 0, got {self.num_contrastive}")
        if self.solution_content not in ("solution", "think_and_solution", "think"):
            raise ValueError(f"TeacherContextConfig.solution_content: unknown value {self.solution_content!r}")
        if self.template not in ("credit", "sdpo"):
            raise ValueError(f"TeacherContextConfig.template must be 'credit' or 'sdpo', got {self.template!r}")
        if self.sibling_choice not in ("first", "random"):
            raise ValueError(f"TeacherContextConfig.sibling_choice must be 'first' or 'random', got {self.sibling_choice!r}")


@dataclass
class SampleSequences:
    """Token sequences of one rollout sample; spans are [start, end) indices into their sequence."""

    student_ids: list[int]
    """prompt_ids(x_i) + y_i."""
    teacher_ids: list[int]
    """prompt_ids(x_i + privileged_i) + y_i (same y_i tokens)."""
    contrastive_ids: list[list[int]]
    """C sequences: teacher context with x'_k instead of x_i, same privileged suffix and y_i."""
    response_length: int
    """len(y_i); the response is the last ``response_length`` tokens of every sequence."""
    has_teacher_signal: bool
    """False when the context holds neither a sibling solution nor feedback (mask the loss)."""
    sibling_index: int | None
    """Batch index of the sibling whose solution is in the context (never this sample), or None."""
    teacher_x_span: tuple[int, int]
    """Tokens of x_i inside ``teacher_ids``."""
    teacher_privileged_span: tuple[int, int]
    """Tokens of solution + feedback + instruction inside ``teacher_ids`` (empty if no signal)."""
    contrastive_x_spans: list[tuple[int, int]] = field(default_factory=list)
    """Tokens of x'_k inside each contrastive sequence."""
    contrastive_source_indices: list[int] = field(default_factory=list)
    """Batch index of a sample whose prompt served as x'_k."""

    def response_start(self, sequence: Sequence[int]) -> int:
        """Index where the response begins in ``sequence`` (any of this sample's sequences)."""
        return len(sequence) - self.response_length


def split_think_trace(text: str) -> tuple[str, str]:
    """(think trace, solution without the <think> blocks) of a response text."""
    think = "\n".join(part.strip() for part in _THINK.findall(text))
    return think, _THINK.sub("", text).strip()


def _solution_text(text: str, content: str) -> str:
    think, solution = split_think_trace(text)
    if content == "solution":
        return solution
    if content == "think":
        return think
    return text.strip()


def _prompt_key(record: dict[str, Any]) -> str:
    return str(record["id"]) if record.get("id") is not None else record["prompt"]


def _pick_sibling(index: int, group_ids: Sequence[Any], rewards: Sequence[float], config: TeacherContextConfig,
                  rng: random.Random) -> int | None:
    candidates = [
        j for j in range(len(group_ids))
        if j != index and group_ids[j] == group_ids[index] and rewards[j] >= config.success_threshold
    ]
    if not candidates:
        return None
    return candidates[0] if config.sibling_choice == "first" else rng.choice(candidates)


def _privileged_suffix(i: int, sibling: int | None, records, texts, feedbacks, config) -> tuple[str, bool, int | None]:
    """(suffix text, has_teacher_signal, index of the sibling whose solution is in the suffix)."""
    record = records[i]
    if config.mode == "rlsd":
        answer = record.get("reference_answer")
        if not answer:
            raise ValueError(
                f"rlsd teacher context needs record['reference_answer'] (record id {record.get('id')!r}); "
                "use a loader that provides it or mode='sdpo'"
            )
        return rlsd_privileged_text(str(answer), record.get("task", "")), True, None
    solution = _solution_text(texts[sibling], config.solution_content) if sibling is not None else ""
    feedback = (feedbacks[i] or "").strip() if config.include_feedback else ""
    if solution and config.feedback_only_without_solution:
        feedback = ""
    if not solution and not feedback:
        return "", False, None
    used_sibling = sibling if solution else None
    if config.template == "sdpo":
        return sdpo_privileged_text(solution, feedback), True, used_sibling
    return teacher_privileged_text(record.get("task", ""), solution, feedback), True, used_sibling


def _contrastive_sources(i: int, keys: list[str], representatives: dict[str, int], count: int, rng: random.Random) -> list[int]:
    others = [key for key in representatives if key != keys[i]]
    if count and not others:
        raise ValueError(
            "CREDIT contrastive contexts need at least two distinct prompts in the batch "
            f"(num_contrastive={count}); increase the number of prompts per batch or set num_contrastive=0"
        )
    # CHOICE: without replacement when C <= number of other prompts, else with replacement.
    chosen = rng.sample(others, count) if count <= len(others) else [rng.choice(others) for _ in range(count)]
    return [representatives[key] for key in chosen]


def build_teacher_contexts(
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    group_ids: Sequence[Any],
    response_ids: Sequence[Sequence[int]],
    rewards: Sequence[float],
    feedbacks: Sequence[str],
    config: TeacherContextConfig | None = None,
    seed: int = 0,
    response_texts: Sequence[str] | None = None,
) -> list[SampleSequences]:
    """Build :class:`SampleSequences` for every sample of a rollout batch.

    ``records[i]`` is sample i's prompt record; ``group_ids[i]`` identifies its GRPO group
    (same prompt); ``response_texts`` (decoded responses, for sibling solutions) default to
    ``tokenizer.decode(ids, skip_special_tokens=True)``. ``seed`` makes the contrastive draw
    (and ``sibling_choice='random'``) reproducible; pass a per-step seed.
    """
    config = config or TeacherContextConfig()
    count = len(records)
    for name, values in (("group_ids", group_ids), ("response_ids", response_ids), ("rewards", rewards), ("feedbacks", feedbacks)):
        if len(values) != count:
            raise ValueError(f"build_teacher_contexts: {name} has {len(values)} entries for {count} records")
    if response_texts is None:
        response_texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in response_ids]
    rng = random.Random(seed)
    keys = [_prompt_key(record) for record in records]
    representatives: dict[str, int] = {}
    for index, key in enumerate(keys):
        representatives.setdefault(key, index)
    samples = []
    for i, record in enumerate(records):
        response = list(response_ids[i])
        sibling = None if config.mode == "rlsd" else _pick_sibling(i, group_ids, rewards, config, rng)
        suffix, has_signal, used_sibling = _privileged_suffix(i, sibling, records, response_texts, feedbacks, config)
        student = encode_prompt_segments(tokenizer, record.get("system"), record["prompt"])
        teacher = encode_prompt_segments(tokenizer, record.get("system"), record["prompt"], suffix)
        sources = _contrastive_sources(i, keys, representatives, config.num_contrastive, rng)
        contrastive = [encode_prompt_segments(tokenizer, record.get("system"), records[j]["prompt"], suffix) for j in sources]
        samples.append(
            SampleSequences(
                student_ids=student.ids + response,
                teacher_ids=teacher.ids + response,
                contrastive_ids=[c.ids + response for c in contrastive],
                response_length=len(response),
                has_teacher_signal=has_signal,
                sibling_index=used_sibling,
                teacher_x_span=teacher.x_span,
                teacher_privileged_span=teacher.suffix_span,
                contrastive_x_spans=[c.x_span for c in contrastive],
                contrastive_source_indices=sources,
            )
        )
    return samples
