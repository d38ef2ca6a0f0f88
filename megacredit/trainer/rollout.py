"""Rollout and reward for one step: prompts -> G responses each -> reward and feedback z.

Generation and scoring run on global rank 0 (where the rollout engine lives); the finished
:class:`RolloutBatch` is broadcast so every rank holds the same batch. Everything random is
seeded from (training seed, step), so a resumed run regenerates exactly the same batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from megacredit.data.templates import encode_student_prompt
from megacredit.envs.base import EnvResult, Environment
from megacredit.rollout.base import RolloutEngine, SamplingParams
from megacredit.utils.progress import ProgressReporter


@dataclass
class RolloutBatch:
    """G samples per prompt, grouped contiguously (sample i answers prompt i // G)."""

    records: list[dict[str, Any]]
    """Prompt record of every sample (repeated G times)."""
    group_ids: list[int]
    """GRPO group of every sample."""
    prompt_ids: list[list[int]]
    """Student prompt token ids of every sample."""
    response_ids: list[list[int]]
    """Generated token ids (the stop token included)."""
    response_texts: list[str]
    """Decoded responses (special tokens skipped)."""
    finish_reasons: list[str]
    """"stop" or "length"."""
    rewards: list[float] = field(default_factory=list)
    """Environment reward in [0, 1]."""
    feedbacks: list[str] = field(default_factory=list)
    """Environment feedback z."""
    engine_logprobs: list[list[float]] = field(default_factory=list)
    """The engine's log-probs of each sample's generated tokens (RolloutOutput.logprobs)."""

    def __len__(self) -> int:
        return len(self.records)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A reproducible per-step seed (same seed + step -> same draws, also after a resume)."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


class PromptStream:
    """Deterministic, resumable order of training prompts: epoch-wise shuffles from the seed."""

    def __init__(self, records: Sequence[dict[str, Any]], prompts_per_step: int, seed: int, shuffle: bool = True):
        if not records:
            raise ValueError("the training set is empty: check data.train_path / data.num_generated_train")
        if prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step must be >= 1, got {prompts_per_step}")
        self.records, self.prompts_per_step, self.seed, self.shuffle = list(records), prompts_per_step, seed, shuffle

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(step_seed(self.seed, epoch, salt=17)).shuffle(order)
        return order

    def batch(self, step: int) -> list[dict[str, Any]]:
        """The prompts of training step ``step`` (0-based); depends on nothing but the step."""
        start = step * self.prompts_per_step
        picked = []
        for position in range(start, start + self.prompts_per_step):
            epoch, offset = divmod(position, len(self.records))
            picked.append(self.records[self._epoch_order(epoch)[offset]])
        return picked


def generate(engine: RolloutEngine, tokenizer: Any, records: Sequence[dict[str, Any]],
             params: SamplingParams, progress: ProgressReporter | None = None,
             description: str = "rollout") -> RolloutBatch:
    """Sample ``params.n`` responses per prompt record (call on the engine's rank); the samples
    done are shown as ``description`` on ``progress``."""
    prompts = [encode_student_prompt(tokenizer, record) for record in records]
    with (progress or ProgressReporter()).task(description, len(prompts) * params.n, "samples") as advance:
        outputs = engine.generate(prompts, params, progress=advance)
    return RolloutBatch(
        records=[records[o.prompt_index] for o in outputs],
        group_ids=[o.prompt_index for o in outputs],
        prompt_ids=[list(o.prompt_ids) for o in outputs],
        response_ids=[list(o.token_ids) for o in outputs],
        response_texts=[tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs],
        finish_reasons=[o.finish_reason for o in outputs],
        engine_logprobs=[list(o.logprobs) for o in outputs],
    )


def score(env: Environment, batch: RolloutBatch, split: str = "train", max_workers: int = 2) -> list[EnvResult]:
    """Reward and feedback of every sample; fills ``batch.rewards`` / ``batch.feedbacks``.

    An environment failure on one sample (a bug, a malformed record) gives reward 0 and an
    explanatory feedback instead of ending the run.
    """
    try:
        results = env.evaluate_batch(batch.records, batch.response_texts, split, max_workers)
    except Exception:  # noqa: BLE001 - fall back to one-by-one to isolate the bad sample
        results = []
        for record, text in zip(batch.records, batch.response_texts):
            try:
                results.append(env.evaluate(record, text, split))
            except Exception as error:  # noqa: BLE001
                results.append(EnvResult(0.0, "", {"env_error": f"{type(error).__name__}: {error}"}))
    batch.rewards = [float(r.reward) for r in results]
    batch.feedbacks = [r.feedback for r in results]
    return results

