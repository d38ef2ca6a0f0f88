"""RLSD: the teacher's evidence ratio as token-level credit inside GRPO (RLSD paper section 4).

    Delta_t = sg(log P_T(y_t) - log P_S(y_t))                                    (eq. 13)
    w_t     = exp(sign(A) * Delta_t) = (P_T(y_t) / P_S(y_t))^sign(A)               (eq. 14)
    A_hat_t = A * ((1 - lambda) + lambda * clip(w_t, 1 - eps_w, 1 + eps_w))       (Alg. 1 line 17)

(eq. 15 is the lambda = 1 case.) P_T is the model with the ground-truth answer in context, P_S
the same model without it, both on the SAMPLED token y_t only. A_hat_t replaces the GRPO
advantage in the same clipped surrogate (section 4.2; use ``grpo.ppo_clip_loss`` with the
[B, T] advantages); there is no distillation loss.

Direction anchoring (section 4.1, Appendix A.6): for lambda in [0, 1] and eps_w in [0, 1),
(1 - lambda) + lambda * clip(w_t, ...) >= 1 - lambda * eps_w > 0, so sign(A_hat_t) = sign(A) for
every token; A = 0 gives A_hat_t = 0 (sign(0) = 0 makes w_t = 1). lambda = 0 is plain GRPO.
Defaults (section 5.1): eps_w = 0.2; lambda from ``schedules.LambdaSchedule.rlsd_paper_default()``
(0.5 -> 0 over 50 steps); teacher = hard copy of the student every 10 steps.
"""

from __future__ import annotations

import torch

from megacredit.algorithms.losses import check_mask_2d, check_same_shape, masked_mean, zero_masked


def check_rlsd_hyperparameters(eps_w: float, lam: float) -> None:
    """The sign guarantee needs lambda in [0, 1] and eps_w in [0, 1)."""
    if not 0.0 <= eps_w < 1.0:
        raise ValueError(f"eps_w must be in [0, 1) so that clip(w, 1 - eps_w, ...) > 0, got {eps_w}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (RLSD mixing lambda) must be in [0, 1], got {lam}")


def _check_sequence_advantages(seq_adv: torch.Tensor, mask: torch.Tensor) -> None:
    if seq_adv.shape != (mask.shape[0],):
        raise ValueError(f"seq_adv must be [B]={mask.shape[0]} (one GRPO advantage per sample), got {tuple(seq_adv.shape)}")


def evidence_weights(
    seq_adv: torch.Tensor, evidence: torch.Tensor, mask: torch.Tensor, eps_w: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14 and the clip of eq. 15 for any per-token evidence (Delta_t here, S_t in credit_rlsd).

    Returns ``(w_t, clip(w_t, 1 - eps_w, 1 + eps_w))``, both detached [B, T]; masked positions
    hold w_t = 1 (their evidence is ignored, even if it is NaN/inf from padding).
    """
    check_mask_2d(mask)
    check_same_shape("mask", mask, evidence=evidence)
    _check_sequence_advantages(seq_adv, mask)
    with torch.no_grad():
        direction = torch.sign(seq_adv).to(evidence.dtype).unsqueeze(-1)  # sign(A), [B, 1]
        safe_evidence = zero_masked(evidence.detach(), mask)  # sg(.) of eq. 13
        weights = torch.exp(direction * safe_evidence)  # eq. 14 (may be inf: clipped next)
        clipped = weights.clamp(1.0 - eps_w, 1.0 + eps_w)  # eq. 15
    return weights, clipped


def evidence_weighted_advantages(
    seq_adv: torch.Tensor, evidence: torch.Tensor, mask: torch.Tensor, eps_w: float, lam: float
) -> torch.Tensor:
    """Algorithm 1 line 17 for a given evidence: A * ((1 - lambda) + lambda * clip(w_t)); [B, T]."""
    check_rlsd_hyperparameters(eps_w, lam)
    _, clipped = evidence_weights(seq_adv, evidence, mask, eps_w)
    token_advantages = seq_adv.detach().to(clipped.dtype).unsqueeze(-1) * ((1.0 - lam) + lam * clipped)
    return zero_masked(token_advantages, mask)


def rlsd_token_advantages(
    seq_adv: torch.Tensor,
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    mask: torch.Tensor,
    eps_w: float = 0.2,
    lam: float = 0.5,
) -> torch.Tensor:
    """RLSD token advantages A_hat_t (eq. 13-14, Algorithm 1 line 17); [B, T], 0 where masked.

    Args:
        seq_adv: [B] GRPO sequence advantages A (``grpo.group_advantages``).
        teacher_logp: [B, T] log P_T(y_t) = log pi_teacher(y_t | x, r, y<t) of the sampled tokens.
        student_logp: [B, T] log P_S(y_t) = log pi_theta(y_t | x, y<t) of the same tokens.
        mask: [B, T] valid response tokens.
        eps_w: clip half-width of w_t (paper 0.2), in [0, 1).
        lam: mixing lambda in [0, 1] (schedule it with ``LambdaSchedule``); 0 = GRPO.

    The result is detached (an advantage), and sign(A_hat_t) == sign(A) at every valid token.
    """
    check_same_shape("mask", mask, teacher_logp=teacher_logp, student_logp=student_logp)
    privileged_gain = teacher_logp - student_logp  # Delta_t before sg (eq. 13)
    return evidence_weighted_advantages(seq_adv, privileged_gain, mask, eps_w, lam)


def evidence_weight_metrics(
    seq_adv: torch.Tensor, evidence: torch.Tensor, mask: torch.Tensor, eps_w: float
) -> dict[str, torch.Tensor]:
    """Clip fraction and weight statistics over ALL valid tokens (masked means, detached).

    ``clip_fraction``: share of valid tokens with w_t outside [1 - eps_w, 1 + eps_w] (the paper
    reports 3-6%); tokens of samples with A = 0 have w_t = 1 and count as not clipped.
    """
    weights, clipped = evidence_weights(seq_adv, evidence, mask, eps_w)
    with torch.no_grad():
        was_clipped = (weights != clipped).to(clipped.dtype)
        return {
            "clip_fraction": masked_mean(was_clipped, mask),
            "weight_mean": masked_mean(clipped, mask),
            "evidence_mean": masked_mean(zero_masked(evidence.detach(), mask), mask),
        }


def rlsd_metrics(
    seq_adv: torch.Tensor,
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    mask: torch.Tensor,
    eps_w: float = 0.2,
) -> dict[str, torch.Tensor]:
    """RLSD diagnostics: ``clip_fraction`` of w_t, mean clipped weight, mean Delta_t."""
    check_same_shape("mask", mask, teacher_logp=teacher_logp, student_logp=student_logp)
    return evidence_weight_metrics(seq_adv, teacher_logp - student_logp, mask, eps_w)
