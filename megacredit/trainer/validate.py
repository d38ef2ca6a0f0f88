"""Periodic validation: avg@k with a bootstrap CI, sampled as in the paper (T=0.6, top-p 0.95).

Runs on the rollout engine's rank with the current policy weights (the engine is synced before
validation). Uses every test of an environment (``split='val'``).
"""

from __future__ import annotations

from typing import Any, Sequence

from megacredit.data.templates import stop_token_ids
from megacredit.envs.base import Environment
from megacredit.rollout.base import RolloutEngine, SamplingParams
from megacredit.trainer import rollout as rollout_lib
from megacredit.reporting.validation_stats import avg_at_k, mean_pass_at_k
from megacredit.utils.progress import ProgressReporter


def validation_params(cfg, tokenizer: Any, seed: int) -> SamplingParams:
    """Sampling settings of ``cfg.validation`` (max_new_tokens and the stop rule: the rollout's)."""
    val = cfg.validation
    return SamplingParams(temperature=val.temperature, top_p=val.top_p, top_k=-1, n=val.k, seed=seed,
                          max_new_tokens=val.max_new_tokens or cfg.rollout.max_new_tokens,
                          stop_token_ids=stop_token_ids(tokenizer, cfg.rollout.stop_at_newline))


def evaluate(engine: RolloutEngine, tokenizer: Any, env: Environment, records: Sequence[dict[str, Any]],
             params: SamplingParams, bootstrap_samples: int, confidence: float, seed: int,
             progress: ProgressReporter | None = None) -> dict[str, float]:
    """val/ metrics: avg@k of ``records`` (k = ``params.n``) with a prompt-level bootstrap CI,
    unbiased pass@k and the mean response length. The samples done are shown on ``progress``."""
    if not records:
        raise ValueError("validation set is empty: set data.val_path or data.num_generated_val > 0")
    batch = rollout_lib.generate(engine, tokenizer, records, params, progress, description="validation")
    rollout_lib.score(env, batch, split="val")
    scores: list[list[float]] = [[] for _ in records]
    for group, reward in zip(batch.group_ids, batch.rewards):
        scores[group].append(reward)
    metrics = avg_at_k(scores, bootstrap_samples=bootstrap_samples, confidence=confidence, seed=seed).to_metrics()
    metrics["val/pass_at_k"] = mean_pass_at_k(scores, params.n)
    metrics["val/response_length_mean"] = sum(map(len, batch.response_ids)) / len(batch.response_ids)
    return metrics
