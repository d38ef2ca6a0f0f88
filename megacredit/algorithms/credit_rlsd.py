"""CREDIT-RLSD hybrid (beyond both papers): RLSD's direction-anchored weight with CREDIT's evidence.

RLSD (RLSD paper eq. 13-14) weights each sampled token by the privileged gain
Delta_t = log P_T(y_t) - log P_S(y_t), which also rewards input-GENERIC tokens that any problem
with the same feedback would favour (CREDIT section 3.2). This hybrid replaces Delta_t by
CREDIT's contrastive-debiased, input-specific evidence on the sampled token

    S_t = f_t[y_t] - (1/C) sum_k g_{k,t}[y_t]       (CREDIT eq. 6 with the C-sample baseline, eq. 8)
    f_t = log pi_ref(. | x, y<t, z),   g_{k,t} = log pi_ref(. | x'_k, y<t, z)

and keeps everything else of RLSD: w_t = exp(sign(A) S_t), clip to [1 - eps_w, 1 + eps_w] and
A_hat_t = A ((1 - lambda) + lambda clip(w_t)) (Algorithm 1 line 17). The direction still comes
only from the environment advantage A (sign(A_hat_t) = sign(A)); the teacher and the
contrastive passes modulate only the magnitude. No distillation loss; use A_hat_t in
``grpo.ppo_clip_loss``.

CHOICE: S_t is used at full strength (CREDIT's lambda does not enter; the RLSD lambda and the
clip bound its influence). The student log-prob does not appear: both terms of S_t are
teacher passes that see the same feedback z, so S_t measures how much the CURRENT input x,
rather than z alone, supports y_t.
"""

from __future__ import annotations

import torch

from megacredit.algorithms.credit import check_contrastive_shape
from megacredit.algorithms.losses import check_same_shape
from megacredit.algorithms.rlsd import evidence_weight_metrics, evidence_weighted_advantages


def input_specific_evidence(teacher_sampled_logp: torch.Tensor, contrastive_sampled_logp: torch.Tensor) -> torch.Tensor:
    """S_t = f_t[y_t] - mean_k g_{k,t}[y_t]; [B, T] from [B, T] and [C, B, T]."""
    check_contrastive_shape(contrastive_sampled_logp, teacher_sampled_logp, "contrastive_sampled_logp")
    return teacher_sampled_logp - contrastive_sampled_logp.mean(dim=0)


def credit_rlsd_token_advantages(
    seq_adv: torch.Tensor,
    teacher_sampled_logp: torch.Tensor,
    contrastive_sampled_logp: torch.Tensor,
    mask: torch.Tensor,
    eps_w: float = 0.2,
    lam: float = 0.5,
) -> torch.Tensor:
    """Hybrid token advantages A * ((1 - lambda) + lambda clip(exp(sign(A) S_t))); [B, T].

    Args:
        seq_adv: [B] GRPO sequence advantages.
        teacher_sampled_logp: [B, T] f_t[y_t] of the sampled tokens.
        contrastive_sampled_logp: [C, B, T] g_{k,t}[y_t] of the same tokens.
        mask: [B, T] valid response tokens.
        eps_w, lam: as in :func:`megacredit.algorithms.rlsd.rlsd_token_advantages`.
    """
    check_same_shape("mask", mask, teacher_sampled_logp=teacher_sampled_logp)
    evidence = input_specific_evidence(teacher_sampled_logp, contrastive_sampled_logp)
    return evidence_weighted_advantages(seq_adv, evidence, mask, eps_w, lam)


def credit_rlsd_metrics(
    seq_adv: torch.Tensor,
    teacher_sampled_logp: torch.Tensor,
    contrastive_sampled_logp: torch.Tensor,
    mask: torch.Tensor,
    eps_w: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Clip fraction of the hybrid weight, mean clipped weight, mean S_t (``evidence_mean``)."""
    check_same_shape("mask", mask, teacher_sampled_logp=teacher_sampled_logp)
    evidence = input_specific_evidence(teacher_sampled_logp, contrastive_sampled_logp)
    return evidence_weight_metrics(seq_adv, evidence, mask, eps_w)
