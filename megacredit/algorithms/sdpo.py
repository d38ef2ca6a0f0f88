"""SDPO: top-K self-distillation to a feedback-conditioned self-teacher (CREDIT section 2, eq. 2).

CREDIT eq. 2:   r_t(v) = log pi_ref(v | x, y<t, z) - log pi_theta(v | x, y<t)
Loss:           sum_t D( pi_theta(. | x, y<t) , sg pi_ref(. | x, y<t, z) ) on a top-K_v set;
                for D = reverse KL its gradient is a policy gradient with per-vocabulary
                advantages r_t(v) (see credit.py for the exact form on a renormalised top-K set).

Inputs are per response position ``[..., K]`` NORMALISED FULL-VOCABULARY log-probs of the same
K token ids for student and teacher (from :mod:`megacredit.algorithms.topk`); this module never
sees the vocabulary. Which ids (``topk_source``) is the CALLER's choice:

* ``teacher`` (default, CREDIT Table 3: "teacher's top-20 / top-100 tokens"): ids = top-K of
  pi_ref(. | x, y<t, z); the student's log-probs are gathered at those ids.
* ``student`` (the public SDPO code, lasgroup/SDPO ``verl/workers/actor/dp_actor.py``, whose
  teacher pass takes ``topk_indices=student_topk_indices``): ids = top-K of pi_theta(. | x, y<t);
  the teacher's log-probs are gathered at those ids. The ids are not differentiable in either case.

Top-K distributions ("bins"), as the public SDPO code (``distillation_add_tail`` of
``SelfDistillationConfig`` in lasgroup/SDPO ``verl/workers/config/actor.py``; the ``add_tail`` /
``renorm_topk_log_probs`` helpers inside ``compute_self_distillation_loss``, below):

* ``tail=False``: both sides renormalised within the K ids, p_k / sum_j p_j.
* ``tail=True``: K+1 bins, the K probabilities as they are plus a tail bin
  log(1 - sum_k p_k) holding the rest of the mass (computed stably by topk.log_tail_mass; a
  top-K mass that rounds to 1 gives a tail of ~eps(dtype), never NaN).

Divergence convention (matches the public SDPO code's ``alpha``: ``compute_self_distillation_loss``
in lasgroup/SDPO ``verl/trainer/ppo/core_algos.py``, which special-cases alpha = 0 / 1 as the
two KLs and otherwise takes ``lerp(KL(S||M), KL(T||M), alpha)`` with M = (1 - alpha) S + alpha T;
read, not copied):

* ``alpha = 1``: reverse KL  KL(S || T) = sum_v S(v) (log S(v) - log T(v))   (code tasks)
* ``alpha = 0``: forward KL  KL(T || S) = sum_v T(v) (log T(v) - log S(v))
* ``0 < alpha < 1``: generalised JSD with mixture M = (1 - alpha) S + alpha T,
      JSD_alpha = (1 - alpha) KL(S || M) + alpha KL(T || M)               (science/tool: 0.5)
  The endpoints are defined as the KLs, not as the alpha -> 0/1 limits of this formula (which
  vanish, because M -> S or M -> T). The exact relation: JSD_alpha / alpha -> KL(T || S) as
  alpha -> 0 and JSD_alpha / (1 - alpha) -> KL(S || T) as alpha -> 1 (first-order expansion
  of KL(S || M) is O(alpha^2)); tested. So alpha = 0 / 1 are the KLs "up to the alpha scale".

Off-policy importance weight (public SDPO ``is_clip``, same function as above): when a mini-batch is not the one the
rollout policy produced (several PPO mini-batches/epochs per rollout), the per-token loss is
multiplied by ``w_t = min(exp(clamp(log pi_theta(y_t) - log pi_old(y_t), -20, 20)), is_clip)``
on the SAMPLED token y_t, detached (no gradient through w_t), with no lower clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megacredit.algorithms.losses import (
    check_mask_2d,
    check_same_shape,
    masked_mean,
    zero_masked,
)
from megacredit.algorithms.topk import log_tail_mass

# Same clamp of the log importance ratio as the public SDPO code and verl (no overflow).
IS_LOG_RATIO_CLAMP = 20.0


def compute_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 inputs are up-cast to float32; float32 and float64 stay as they are."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def topk_bins(topk_logp: torch.Tensor, tail: bool) -> torch.Tensor:
    """Normalised log-distribution over the top-K bins: [..., K] (renormalised) or [..., K+1].

    ``topk_logp`` holds normalised full-vocabulary log-probs of K ids (sum of exp <= 1).
    """
    logp = compute_precision(topk_logp)
    if not tail:
        return logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    return torch.cat([logp, log_tail_mass(logp).unsqueeze(-1)], dim=-1)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise p (log p - log q), with the convention 0 log 0 = 0 (and finite gradients)."""
    zero_mass = torch.isneginf(log_p)
    safe_log_p = torch.where(zero_mass, torch.zeros_like(log_p), log_p)
    terms = torch.exp(safe_log_p) * (safe_log_p - log_q)
    return torch.where(zero_mass, torch.zeros_like(terms), terms)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the last dim."""
    return _kl_terms(log_p, log_q).sum(dim=-1)


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha must be in [0, 1] (1 = reverse KL, 0 = forward KL, between = JSD), got {alpha}"
        )


def divergence_on_bins(student_bins: torch.Tensor, teacher_bins: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_alpha(S, T) over the last dim of two normalised log-distributions (module docstring)."""
    check_alpha(alpha)
    if alpha == 1.0:
        return kl_divergence(student_bins, teacher_bins)  # reverse KL(S || T)
    if alpha == 0.0:
        return kl_divergence(teacher_bins, student_bins)  # forward KL(T || S)
    log_mixture = torch.logsumexp(
        torch.stack([student_bins + math.log(1.0 - alpha), teacher_bins + math.log(alpha)]), dim=0
    )  # log M, M = (1 - alpha) S + alpha T
    return (1.0 - alpha) * kl_divergence(student_bins, log_mixture) + alpha * kl_divergence(
        teacher_bins, log_mixture
    )


def topk_divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float, tail: bool = False
) -> torch.Tensor:
    """Per-position divergence D_alpha(S, T) on a top-K set; [..., K] inputs -> [...] output.

    Both inputs are normalised full-vocabulary log-probs of the SAME K ids. ``tail=False``
    renormalises both within the K ids; ``tail=True`` adds the (K+1)-th tail bin on each side.
    No stop-gradient here (``sdpo_loss`` detaches the teacher).
    """
    check_same_shape("student_logp", student_logp, teacher_logp=teacher_logp)
    return divergence_on_bins(topk_bins(student_logp, tail), topk_bins(teacher_logp, tail), alpha)


def off_policy_importance_weights(
    student_sampled_logp: torch.Tensor, old_sampled_logp: torch.Tensor, is_ratio_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Public SDPO ``is_clip`` rule: w_t = min(exp(clamp(logp - old_logp, +-20)), is_ratio_clip).

    Returns the detached weights [B, T] and a bool [B, T] of where the clip was active.
    """
    if is_ratio_clip <= 0:
        raise ValueError(f"is_ratio_clip must be > 0 (e.g. 2.0) or None to disable, got {is_ratio_clip}")
    log_ratio = (student_sampled_logp - old_sampled_logp).detach()
    ratio = torch.exp(log_ratio.clamp(-IS_LOG_RATIO_CLAMP, IS_LOG_RATIO_CLAMP))
    return ratio.clamp(max=is_ratio_clip), ratio > is_ratio_clip


@dataclass
class DistillationLossOutput:
    """What a top-K distillation loss (SDPO, CREDIT, OPSD) hands back to the trainer."""

    per_token_loss: torch.Tensor
    """[B, T] divergence (times the off-policy weight if enabled); exactly 0 where not valid."""
    loss_mask: torch.Tensor
    """[B, T] float: response mask AND has_teacher_signal; aggregate the loss with this mask."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached 0-dim diagnostics (masked means over this batch)."""


def validity_mask(mask: torch.Tensor, has_teacher_signal: torch.Tensor | None) -> torch.Tensor:
    """[B, T] bool: response tokens of samples that have a teacher signal (CREDIT section 2)."""
    check_mask_2d(mask)
    valid = mask.to(torch.bool)
    if has_teacher_signal is None:
        return valid
    if has_teacher_signal.shape != (mask.shape[0],):
        raise ValueError(
            f"has_teacher_signal must be [B]={mask.shape[0]} (one flag per sample), "
            f"got {tuple(has_teacher_signal.shape)}"
        )
    return valid & has_teacher_signal.to(device=mask.device, dtype=torch.bool).unsqueeze(-1)


def fill_invalid_positions(topk_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace [..., B, T, K] log-probs at invalid positions by a harmless uniform 1/(2K).

    Padding positions may hold -inf/NaN; computing on them and masking afterwards would leak
    NaN into the gradient (0 * NaN). Filling them first keeps every gradient finite.
    """
    filler = torch.full_like(topk_logp, -math.log(2.0 * topk_logp.shape[-1]))
    return torch.where(valid.unsqueeze(-1), topk_logp, filler)


def check_topk_inputs(mask: torch.Tensor, **topk_tensors: torch.Tensor) -> None:
    """Every [B, T, K] input must match the mask's [B, T] and share K."""
    check_mask_2d(mask)
    widths = set()
    for name, tensor in topk_tensors.items():
        if tensor.dim() != 3 or tuple(tensor.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"{name} must be [B, T, K] with [B, T]={tuple(mask.shape)}, got {tuple(tensor.shape)}")
        widths.add(tensor.shape[-1])
    if len(widths) > 1:
        raise ValueError(f"top-K inputs disagree on K: {sorted(widths)}; gather all at the same K ids")


def distillation_loss_on_bins(
    student_bins: torch.Tensor,
    teacher_bins: torch.Tensor,
    valid: torch.Tensor,
    alpha: float,
    is_ratio_clip: float | None = None,
    student_sampled_logp: torch.Tensor | None = None,
    old_sampled_logp: torch.Tensor | None = None,
) -> DistillationLossOutput:
    """Shared core of SDPO / CREDIT / OPSD: D_alpha(S, sg T) per token, masked, IS-weighted."""
    divergence = divergence_on_bins(student_bins, teacher_bins.detach(), alpha)
    per_token = divergence
    metrics: dict[str, torch.Tensor] = {}
    if is_ratio_clip is not None:
        if student_sampled_logp is None or old_sampled_logp is None:
            raise ValueError(
                "is_ratio_clip needs student_sampled_logp and old_sampled_logp ([B, T] log-probs "
                "of the sampled tokens under the current and the rollout policy)"
            )
        check_same_shape("mask", valid, student_sampled_logp=student_sampled_logp, old_sampled_logp=old_sampled_logp)
        weights, clipped = off_policy_importance_weights(student_sampled_logp, old_sampled_logp, is_ratio_clip)
        per_token = per_token * weights.to(per_token.dtype)
        metrics["is_ratio_mean"] = masked_mean(weights.to(per_token.dtype), valid)
        metrics["is_clip_fraction"] = masked_mean(clipped.to(per_token.dtype), valid)
    with torch.no_grad():
        metrics["divergence_mean"] = masked_mean(divergence.detach(), valid)
        metrics["teacher_signal_fraction"] = valid.any(dim=-1).to(per_token.dtype).mean()
    return DistillationLossOutput(zero_masked(per_token, valid), valid.to(per_token.dtype), metrics)


def topk_mass_metrics(valid: torch.Tensor, **topk_tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean probability mass the top-K ids hold under each distribution (tail = 1 - this)."""
    with torch.no_grad():
        return {
            f"{name}_topk_mass": masked_mean(torch.logsumexp(compute_precision(t), dim=-1).exp(), valid)
            for name, t in topk_tensors.items()
        }


def sdpo_loss(
    student_topk_logp: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    mask: torch.Tensor,
    has_teacher_signal: torch.Tensor | None,
    alpha: float = 1.0,
    tail: bool = False,
    is_ratio_clip: float | None = None,
    student_sampled_logp: torch.Tensor | None = None,
    old_sampled_logp: torch.Tensor | None = None,
) -> DistillationLossOutput:
    """SDPO per-token distillation loss D_alpha(pi_theta, sg pi_ref(. | x, y<t, z)) on top-K.

    Args:
        student_topk_logp: [B, T, K] log pi_theta(v | x, y<t) at the K ids (with gradient).
        teacher_topk_logp: [B, T, K] log pi_ref(v | x, y<t, z) at the same ids (stop-gradient).
        mask: [B, T] valid response tokens.
        has_teacher_signal: [B] bool; False for samples with neither a solution nor feedback
            (CREDIT section 2): their tokens get no loss and leave the denominator. None = all.
        alpha: 1 reverse KL, 0 forward KL, between generalised JSD (module docstring).
        tail: add the (K+1)-th tail bin instead of renormalising within the K ids.
        is_ratio_clip: None, or the cap of the off-policy importance weight (public ``is_clip``).
        student_sampled_logp, old_sampled_logp: [B, T] sampled-token log-probs under the
            current / rollout policy; required only with ``is_ratio_clip``.

    Returns:
        :class:`DistillationLossOutput`; reduce ``per_token_loss`` with ``losses.aggregate``
        using ``loss_mask`` (not ``mask``) so signal-free samples leave the denominator.
    """
    check_topk_inputs(mask, student_topk_logp=student_topk_logp, teacher_topk_logp=teacher_topk_logp)
    valid = validity_mask(mask, has_teacher_signal)
    student_bins = topk_bins(fill_invalid_positions(student_topk_logp, valid), tail)
    teacher_bins = topk_bins(fill_invalid_positions(teacher_topk_logp.detach(), valid), tail)
    output = distillation_loss_on_bins(
        student_bins, teacher_bins, valid, alpha, is_ratio_clip, student_sampled_logp, old_sampled_logp
    )
    output.metrics.update(topk_mass_metrics(valid, student=student_topk_logp, teacher=teacher_topk_logp))
    return output
