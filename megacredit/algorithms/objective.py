"""What the loss of one micro-batch consumes, and each method's loss and advantage terms.

Pure torch (no Megatron): the Megatron actor gathers, for the samples of a micro-batch, the
student's log-probs (sampled token, and the top-K ids of the distillation set) and hands them
here, in :class:`MicroBatchInputs`, together with what the teacher and old-policy passes stored.
The formulas live in the per-method modules of megacredit/algorithms/; the functions below only
adapt their arguments, and megacredit/algorithms/methods.py says which method uses which:

- PPO family (grpo, rlsd, credit_rlsd): the clipped surrogate (RLSD eq. 2) on the sampled token
  with the method's token advantages (GRPO: RLSD eq. 1; RLSD: eq. 13-14 and Algorithm 1 line 17;
  the hybrid: CREDIT's S_t as RLSD's evidence).
- distillation (sdpo, credit, opsd): top-K self-distillation (CREDIT eq. 2), CREDIT with the
  tilted teacher of CREDIT eq. 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from megacredit.algorithms import credit, credit_rlsd, grpo, opsd, rlsd, sdpo


@dataclass(frozen=True)
class ObjectiveSettings:
    """The hyperparameters the loss needs (a flat view of ``cfg.algorithm``)."""

    method: str
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None
    loss_agg_mode: str = "token-mean"
    alpha: float = 1.0
    tail: bool = False
    is_clip: float | None = None
    credit_lam: float = 0.1
    eps_w: float = 0.2


def pad_per_sample(pieces: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Stack per-sample [R_i, ...] tensors into [B, T_max, ...] (right padding)."""
    return pad_sequence(list(pieces), batch_first=True, padding_value=value)


def response_mask(lengths: Sequence[int]) -> torch.Tensor:
    """[B, T_max] bool mask of the real response positions."""
    t_max = max(lengths)
    return torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]


@dataclass
class MicroBatchInputs:
    """Everything the loss needs for the samples of one micro-batch, padded to [B, T(, K)]."""

    mask: torch.Tensor
    """[B, T] response positions."""
    logp: torch.Tensor
    """[B, T] current-policy log-prob of the sampled token (with gradient)."""
    old_logp: torch.Tensor
    """[B, T] behaviour-policy log-prob of the sampled token (no gradient)."""
    token_advantages: torch.Tensor | None = None
    """[B, T] PPO-family advantages (None for distillation methods)."""
    student_topk_logp: torch.Tensor | None = None
    """[B, T, K] current-policy log-probs on the distillation set (with gradient)."""
    teacher_topk_logp: torch.Tensor | None = None
    """[B, T, K] teacher log-probs on the distillation set."""
    contrastive_topk_logp: torch.Tensor | None = None
    """[C, B, T, K] contrastive-teacher log-probs on the same set (CREDIT)."""
    has_teacher_signal: torch.Tensor | None = None
    """[B] bool: the sample had a sibling solution or feedback."""
    token_weights: torch.Tensor | None = None
    """[B, T] rollout importance weights (algorithm.rollout_is; detached), or None."""


@dataclass
class LossTerms:
    """A micro-batch's share of the mini-batch loss: ``numerator / global denominator``."""

    numerator: torch.Tensor
    denominator: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


PerTokenLoss = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
"""(per-token loss [B, T], the mask it is averaged over [B, T], diagnostics)."""


# ------------------------------------------------------------------------- per-token losses
def ppo_surrogate(settings: ObjectiveSettings, inputs: MicroBatchInputs) -> PerTokenLoss:
    """PPO family: the clipped surrogate with dual clip (RLSD eq. 2) on the token advantages."""
    per_token, metrics = grpo.ppo_clip_loss(
        inputs.logp, inputs.old_logp, inputs.token_advantages, inputs.mask,
        settings.clip_eps_low, settings.clip_eps_high, settings.dual_clip_c)
    return per_token, inputs.mask, metrics


def _off_policy(inputs: MicroBatchInputs, settings: ObjectiveSettings) -> dict:
    return dict(is_ratio_clip=settings.is_clip, student_sampled_logp=inputs.logp, old_sampled_logp=inputs.old_logp)


def sdpo_distillation(settings: ObjectiveSettings, inputs: MicroBatchInputs) -> PerTokenLoss:
    """SDPO: top-K divergence to the self-teacher (CREDIT eq. 2)."""
    out = sdpo.sdpo_loss(inputs.student_topk_logp, inputs.teacher_topk_logp, mask=inputs.mask,
                         tail=settings.tail, alpha=settings.alpha, has_teacher_signal=inputs.has_teacher_signal,
                         **_off_policy(inputs, settings))
    return out.per_token_loss, out.loss_mask, out.metrics


def credit_distillation(settings: ObjectiveSettings, inputs: MicroBatchInputs) -> PerTokenLoss:
    """CREDIT: top-K divergence to the contrastively tilted teacher (CREDIT eq. 8)."""
    out = credit.credit_loss(inputs.student_topk_logp, inputs.teacher_topk_logp, inputs.contrastive_topk_logp,
                             mask=inputs.mask, tail=settings.tail, alpha=settings.alpha,
                             has_teacher_signal=inputs.has_teacher_signal, lam=settings.credit_lam,
                             **_off_policy(inputs, settings))
    return out.per_token_loss, out.loss_mask, out.metrics


def opsd_distillation(settings: ObjectiveSettings, inputs: MicroBatchInputs) -> PerTokenLoss:
    """OPSD baseline: plain top-K distribution matching to the privileged teacher."""
    out = opsd.opsd_loss(inputs.student_topk_logp, inputs.teacher_topk_logp, mask=inputs.mask,
                         tail=settings.tail, alpha=settings.alpha)
    return out.per_token_loss, out.loss_mask, out.metrics


# ----------------------------------------------------------------------- token advantages
TokenAdvantages = tuple[torch.Tensor, dict[str, torch.Tensor]]
"""([B, T] token advantages, diagnostics)."""


def grpo_token_advantages(settings: ObjectiveSettings, seq_adv: torch.Tensor, mask: torch.Tensor,
                          old_logp: torch.Tensor, teacher_sampled_logp: torch.Tensor | None,
                          contrastive_sampled_logp: torch.Tensor | None, lam: float) -> TokenAdvantages:
    """GRPO: the sequence advantage A_i (RLSD eq. 1) on every response token."""
    return grpo.broadcast_sequence_advantages(seq_adv, mask.to(seq_adv.dtype)) * mask, {}


def rlsd_evidence_advantages(settings: ObjectiveSettings, seq_adv: torch.Tensor, mask: torch.Tensor,
                             old_logp: torch.Tensor, teacher_sampled_logp: torch.Tensor | None,
                             contrastive_sampled_logp: torch.Tensor | None, lam: float) -> TokenAdvantages:
    """RLSD: A reweighted by the evidence Delta_t = sg(log P_T(y_t) - log P_S(y_t)) (eq. 13-14).

    CHOICE: P_S is the behaviour policy that generated y (equal to the current policy on the
    first mini-batch); ``lam`` is the scheduled lambda of this step."""
    adv = rlsd.rlsd_token_advantages(seq_adv, teacher_sampled_logp, old_logp, mask, settings.eps_w, lam)
    return adv, rlsd.rlsd_metrics(seq_adv, teacher_sampled_logp, old_logp, mask, settings.eps_w)


def credit_rlsd_evidence_advantages(settings: ObjectiveSettings, seq_adv: torch.Tensor, mask: torch.Tensor,
                                    old_logp: torch.Tensor, teacher_sampled_logp: torch.Tensor | None,
                                    contrastive_sampled_logp: torch.Tensor | None, lam: float) -> TokenAdvantages:
    """CREDIT-RLSD: RLSD's weight with CREDIT's input-specific evidence S_t (credit_rlsd.py)."""
    adv = credit_rlsd.credit_rlsd_token_advantages(
        seq_adv, teacher_sampled_logp, contrastive_sampled_logp, mask, settings.eps_w, lam)
    return adv, credit_rlsd.credit_rlsd_metrics(seq_adv, teacher_sampled_logp, contrastive_sampled_logp, mask,
                                                settings.eps_w)


# ------------------------------------------------------------------ sampled-token evidence
def rlsd_evidence(teacher_sampled_logp: torch.Tensor, student_sampled_logp: torch.Tensor,
                  contrastive_sampled_logp: torch.Tensor | None) -> torch.Tensor:
    """RLSD's Delta_t = log P_T(y_t) - log P_S(y_t) (RLSD eq. 13)."""
    return teacher_sampled_logp - student_sampled_logp


def input_specific_evidence(teacher_sampled_logp: torch.Tensor, student_sampled_logp: torch.Tensor,
                            contrastive_sampled_logp: torch.Tensor | None) -> torch.Tensor:
    """CREDIT's S_t = f_t[y_t] - mean_k g_{k,t}[y_t] (CREDIT eq. 6 with the eq. 8 baseline)."""
    return credit_rlsd.input_specific_evidence(teacher_sampled_logp, contrastive_sampled_logp)
