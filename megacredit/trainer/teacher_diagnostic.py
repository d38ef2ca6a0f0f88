"""Does the self-teacher know more than the student? Its probability of the correct answer.

Self-distillation helps only if the feedback-conditioned teacher puts more mass on the right
answer than the student does (CREDIT section 3: the teacher's privileged context is what the
distillation transfers). Where the environment can point at the answer in a response
(``Environment.answer_location``: arithmetic, multiple choice), a few samples per step are probed:

    student:  prompt(x)          + response[:answer start] + correct answer
    teacher:  prompt(x, z, ...)  + response[:answer start] + correct answer

and the probability of the correct answer's tokens is read from each (the student's current
weights, then the teacher's swapped in; at the trainer's scoring temperature). The answer's
tokens are those that cover its characters when the probed text is tokenised as one string (a
token that also covers the preceding character, e.g. a leading space, is counted with it).

Metrics (docs/metrics.md): ``teacher/answer_prob_teacher``, ``teacher/answer_prob_student``
(mean probability over probed samples) and their gap ``teacher/answer_prob_gain``. The split of
``teacher/delta_v`` by correct / incorrect responses (megacredit/trainer/step_metrics.py) is the
other half of the diagnostic. Samples are split over data-parallel replicas; sums are combined
with the step's other metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from megacredit.data.teacher_context import SampleSequences
from megacredit.envs.base import Environment
from megacredit.trainer.rollout import RolloutBatch
from megacredit.trainer.run import RLRun


@dataclass(frozen=True)
class AnswerProbe:
    """One sample's two probe sequences and how many of their last tokens are the answer."""

    index: int
    student_ids: list[int]
    teacher_ids: list[int]
    answer_tokens: int


def probe_for(tokenizer: Any, env: Environment, record: dict, response_text: str,
              sample: SampleSequences, index: int) -> AnswerProbe | None:
    """The probe of one sample, or None when the environment cannot locate its answer."""
    location = env.answer_location(record, response_text)
    if location is None:
        return None
    text = response_text[: location.start] + location.correct_answer
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    answer_tokens = sum(1 for _, end in offsets if end > location.start)
    if not ids or answer_tokens == 0:
        return None
    student_prompt = sample.student_ids[: len(sample.student_ids) - sample.response_length]
    teacher_prompt = sample.teacher_ids[: len(sample.teacher_ids) - sample.response_length]
    return AnswerProbe(index, student_prompt + ids, teacher_prompt + ids, answer_tokens)


def answer_probes(run: RLRun, batch: RolloutBatch, samples: Sequence[SampleSequences], limit: int) -> list[AnswerProbe]:
    """Up to ``limit`` probes of the batch's samples that have a teacher context (same on every rank)."""
    probes = []
    for index, sample in enumerate(samples):
        if len(probes) == limit:
            break
        if sample.has_teacher_signal:
            probe = probe_for(run.tokenizer, run.env, batch.records[index], batch.response_texts[index], sample, index)
            if probe is not None:
                probes.append(probe)
    return probes


def answer_probability_sums(run: RLRun, batch: RolloutBatch, samples: Sequence[SampleSequences]
                            ) -> dict[str, tuple[float, float]]:
    """``teacher/answer_prob_*`` as (sum, count) on the ranks that hold results ({} elsewhere).

    Collective: every rank of the job calls it (the probes run through Megatron's schedule)."""
    limit = run.cfg.logging.teacher_diagnostic_samples
    if limit <= 0 or not run.method.teacher_pass:
        return {}
    probes = answer_probes(run, batch, samples, limit)
    mine = [probe for j, probe in enumerate(probes) if j % run.ctx.dp_size == run.ctx.dp_rank]
    temperature = run.actor.settings.temperature
    student = run.actor.score_sequences([p.student_ids for p in mine], temperature=temperature)
    teacher = run.actor.score_sequences([p.teacher_ids for p in mine], temperature=temperature, teacher=True)
    if not student or not (run.ctx.is_last_stage and run.ctx.tp_rank == 0):
        return {}
    count = float(len(mine))
    p_student = [math.exp(float(student[j][-p.answer_tokens:].sum())) for j, p in enumerate(mine)]
    p_teacher = [math.exp(float(teacher[j][-p.answer_tokens:].sum())) for j, p in enumerate(mine)]
    return {
        "teacher/answer_prob_student": (sum(p_student), count),
        "teacher/answer_prob_teacher": (sum(p_teacher), count),
        "teacher/answer_prob_gain": (sum(p_teacher) - sum(p_student), count),
    }
