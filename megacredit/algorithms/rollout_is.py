"""Engine/trainer mismatch: truncated importance sampling (rollout IS) and its diagnostics.

The rollout engine (vLLM, SGLang, the embedded sampler) draws y ~ pi_engine, but the loss is
written for samples of pi_old, the trainer's own recomputation of the same weights. Different
kernels, precisions and batch shapes make the two differ a little (the "training-inference
mismatch"). With r_t = log pi_old(y_t) - log pi_engine(y_t) on the sampled tokens:

    token:     w_t = min(exp(r_t), C)                          (one weight per token)
    sequence:  w_t = min(exp(sum_s r_s), C)   for every t      (one weight per sequence)

and the per-token loss becomes ``w_t * loss_t`` with ``w_t`` detached (it changes the measure,
not the objective), aggregated as before. ``token`` is biased with low variance, ``sequence``
unbiased up to the cap with high variance. The log-ratio is clamped to +-20 before exp (as
:data:`megacredit.algorithms.grpo.LOG_RATIO_CLAMP`), so a token the engine found impossible
cannot overflow.

Peers, read for the formulas (their code is not copied): verl
``verl/trainer/ppo/rollout_corr_helper.py::compute_rollout_correction_weights`` (``rollout_is:
token | sequence``, truncation at ``rollout_is_threshold``, default 2.0, weights detached) and
slime ``slime/backends/megatron_utils/loss.py::vanilla_tis_function`` (``--use-tis``: the token
weight ``exp(old - rollout)`` clamped to ``[tis_clip_low, tis_clip]`` multiplies ``pg_loss``).
megacredit truncates from above only, as verl does.

Diagnostics on the sampled tokens (verl's ``compute_offpolicy_metrics`` uses the same
estimators): the mean absolute log-prob difference ``|r_t|``, and KL(pi_engine || pi_old)
estimated from the engine's own samples with k1 = ``-r_t`` (unbiased, may be negative) and
k3 = ``exp(r_t) - 1 - r_t`` (non-negative, low variance).
"""

from __future__ import annotations

from typing import Literal

import torch

from megacredit.algorithms.grpo import LOG_RATIO_CLAMP
from megacredit.algorithms.losses import as_float_mask, check_mask_2d, check_same_shape, masked_sum

RolloutISLevel = Literal["none", "token", "sequence"]
ROLLOUT_IS_LEVELS: tuple[str, ...] = ("none", "token", "sequence")


def _masked_log_ratio(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_t = old - engine on valid positions, exactly 0 elsewhere (padding may hold -inf)."""
    valid = mask.to(device=old_logp.device, dtype=torch.bool)
    return torch.where(valid, old_logp - engine_logp, torch.zeros_like(old_logp))


def rollout_is_weights(
    old_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    level: RolloutISLevel,
    cap: float,
) -> torch.Tensor:
    """[B, T] truncated IS weights min(pi_old / pi_engine, cap), detached, 0 at masked positions.

    old_logp: [B, T] trainer log-probs of the sampled tokens; engine_logp: [B, T] the engine's
    (``RolloutOutput.logprobs``); mask: [B, T] valid response positions; level: "token" or
    "sequence" ("none" gives all ones on valid positions); cap: the truncation C > 0.
    """
    check_mask_2d(mask)
    check_same_shape("old_logp", old_logp, engine_logp=engine_logp, mask=mask)
    if level not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"rollout IS level {level!r} is unknown; use one of {ROLLOUT_IS_LEVELS}")
    if not cap > 0:
        raise ValueError(f"the rollout IS cap must be > 0, got {cap!r}")
    valid = as_float_mask(mask, old_logp)
    if level == "none":
        return valid
    log_ratio = _masked_log_ratio(old_logp.detach(), engine_logp.detach(), mask)
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=-1, keepdim=True).expand_as(old_logp)
    weights = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cap)
    return weights * valid


def mismatch_sums(
    old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, tuple[float, float]]:
    """(sum, token count) of |r_t|, k1 and k3 over the valid tokens (exact means across ranks).

    Keys: ``logprob_abs_diff``, ``kl_k1``, ``kl_k3`` (see the module docstring).
    """
    check_mask_2d(mask)
    check_same_shape("old_logp", old_logp, engine_logp=engine_logp, mask=mask)
    log_ratio = _masked_log_ratio(old_logp.double(), engine_logp.double(), mask)
    count = float(mask.bool().sum())
    safe = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return {
        "logprob_abs_diff": (float(masked_sum(log_ratio.abs(), mask)), count),
        "kl_k1": (float(masked_sum(-log_ratio, mask)), count),
        "kl_k3": (float(masked_sum(torch.exp(safe) - 1.0 - safe, mask)), count),
    }
