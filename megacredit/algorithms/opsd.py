"""OPSD baseline: plain on-policy distribution matching to a privileged self-teacher (RLSD paper section 2).

On-Policy Self-Distillation (RLSD paper refs [7, 8]) trains the student pi_theta(. | x) to match
the SAME model conditioned on privileged information r (e.g. a verified reasoning trace),
pi_theta(. | x, r), at every position of the student's own rollout:

    L_OPSD = sum_t KL( pi_theta(. | x, y<t) || sg pi_T(. | x, r, y<t) )     (reverse KL, top-K)

No environment reward and no advantage enter the loss: it is the distribution-matching
paradigm whose leakage RLSD diagnoses (section 3). It shares SDPO's top-K machinery; the
difference from SDPO is the teacher context (r instead of feedback z / a sibling solution) and
that every sample has a teacher signal. It is provided only as a comparison baseline.
"""

from __future__ import annotations

import torch

from megacredit.algorithms.sdpo import DistillationLossOutput, sdpo_loss


def opsd_loss(
    student_topk_logp: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    mask: torch.Tensor,
    tail: bool = False,
    alpha: float = 1.0,
) -> DistillationLossOutput:
    """Per-token reverse KL (alpha = 1, default) from the student to the privileged teacher.

    Args:
        student_topk_logp: [B, T, K] log pi_theta(v | x, y<t) at the K ids (with gradient).
        teacher_topk_logp: [B, T, K] log pi_theta(v | x, r, y<t) at the same ids (stop-gradient).
        mask: [B, T] valid response tokens (every sample has the privileged teacher).
        tail: (K+1)-th tail bin instead of renormalising within the top-K ids.
        alpha: divergence as in SDPO (kept for ablations; OPSD proper is alpha = 1).
    """
    return sdpo_loss(student_topk_logp, teacher_topk_logp, mask, None, alpha=alpha, tail=tail)
