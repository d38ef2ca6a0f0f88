"""Engine/trainer mismatch in the training loop: the rollout/ diagnostics of every step and the
optional truncated importance-sampling weights (``algorithm.rollout_is``).

Both compare, per sampled token, the engine's log-prob (``RolloutBatch.engine_logprobs``, what
the engine reported while sampling) with the trainer's old-policy log-prob (the old-policy pass,
on the last pipeline stage). Formulas: megacredit/algorithms/rollout_is.py.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megacredit.algorithms.rollout_is import mismatch_sums, rollout_is_weights
from megacredit.algorithms.objective import pad_per_sample, response_mask

MISMATCH_NAMES = {
    "logprob_abs_diff": "rollout/logprob_abs_diff",
    "kl_k3": "rollout/engine_kl",
    "kl_k1": "rollout/engine_kl_k1",
}
"""Names in docs/metrics.md of :func:`megacredit.algorithms.rollout_is.mismatch_sums`."""


def _pairs(indices: Sequence[int], student: dict, engine_logprobs: Sequence[Sequence[float]]):
    """(indices, trainer [B, T], engine [B, T], mask [B, T]) of the samples whose engine
    log-probs cover their response (engines that report none are skipped)."""
    kept = [i for i in indices
            if i < len(engine_logprobs) and len(engine_logprobs[i]) == len(student[i].sampled_logp)
            and len(engine_logprobs[i]) > 0]
    if not kept:
        return kept, None, None, None
    trainer = pad_per_sample([student[i].sampled_logp.detach().double().cpu() for i in kept])
    engine = pad_per_sample([torch.tensor(engine_logprobs[i], dtype=torch.float64) for i in kept])
    return kept, trainer, engine, response_mask([len(engine_logprobs[i]) for i in kept])


def engine_mismatch_sums(indices: Sequence[int], student: dict,
                         engine_logprobs: Sequence[Sequence[float]]) -> dict[str, tuple[float, float]]:
    """rollout/logprob_abs_diff, rollout/engine_kl (k3) and rollout/engine_kl_k1 as (sum, count)."""
    kept, trainer, engine, mask = _pairs(indices, student, engine_logprobs)
    if not kept:
        return {}
    return {MISMATCH_NAMES[key]: value for key, value in mismatch_sums(trainer, engine, mask).items()}


def rollout_is_token_weights(level: str, cap: float, indices: Sequence[int], student: dict,
                             engine_logprobs: Sequence[Sequence[float]]
                             ) -> tuple[dict[int, torch.Tensor] | None, dict[str, tuple[float, float]]]:
    """Per-sample [R] weights min(pi_old / pi_engine, cap) (token or sequence level) for the
    samples this rank trains, and train/rollout_is_weight_mean, train/rollout_is_clip_frac as
    (sum, count). ``level == "none"``: (None, {}). Samples without engine log-probs get 1."""
    if level == "none" or not indices:
        return None, {}
    kept, trainer, engine, mask = _pairs(indices, student, engine_logprobs)
    weights = {i: torch.ones_like(student[i].sampled_logp) for i in indices}
    sums: dict[str, tuple[float, float]] = {}
    if kept:
        table = rollout_is_weights(trainer, engine, mask, level, cap)
        for row, i in enumerate(kept):
            weights[i] = table[row, : int(mask[row].sum())].to(student[i].sampled_logp)
        valid = table[mask]
        sums["train/rollout_is_weight_mean"] = (float(valid.sum()), float(valid.numel()))
        sums["train/rollout_is_clip_frac"] = (float((valid >= cap).sum()), float(valid.numel()))
    return weights, sums
