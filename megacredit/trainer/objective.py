"""The method's loss for one micro-batch, and the token advantages computed before training.

Pure torch (no Megatron): the Megatron actor gathers, for the samples of a micro-batch, the
student's log-probs (sampled token, and the top-K ids of the distillation set) and hands them
here together with what the teacher and old-policy passes stored. Formulas live in
megacredit/algorithms/ (one module per method); this module only routes:

- grpo, rlsd, credit_rlsd: PPO clipped surrogate (RLSD eq. 2) on the sampled token with the
  method's token advantages (GRPO: RLSD eq. 1; RLSD: eq. 13-14 / Alg. 1 l. 17; hybrid: S_t).
- sdpo, credit, opsd: top-K self-distillation (CREDIT eq. 2; CREDIT eq. 8's tilted teacher).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from megacredit.algorithms import credit, credit_rlsd, grpo, opsd, rlsd, sdpo
from megacredit.algorithms.losses import aggregate, loss_denominator

PPO_METHODS = ("grpo", "rlsd", "credit_rlsd")
DISTILLATION_METHODS = ("sdpo", "credit", "opsd")
METHODS = PPO_METHODS + DISTILLATION_METHODS


@dataclass(frozen=True)
class ObjectiveSettings:
    """The hyperparameters the loss needs (a flat view of ``cfg.algorithm``)."""

    method: str
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    loss_agg_mode: str = "token-mean"
    alpha: float = 1.0
    tail: bool = False
    is_clip: float | None = None
    credit_lam: float = 0.1
    eps_w: float = 0.2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"algorithm.name must be one of {list(METHODS)}, got {self.method!r}")

    @property
    def uses_teacher_topk(self) -> bool:
        return self.method in DISTILLATION_METHODS


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


def micro_batch_loss(settings: ObjectiveSettings, inputs: MicroBatchInputs) -> LossTerms:
    """Per-token loss of the method, reduced to (numerator, denominator) for global averaging."""
    if settings.method in PPO_METHODS:
        per_token, metrics = grpo.ppo_clip_loss(
            inputs.logp, inputs.old_logp, inputs.token_advantages, inputs.mask,
            settings.clip_eps_low, settings.clip_eps_high,
        )
        loss_mask = inputs.mask
    else:
        common = dict(mask=inputs.mask, tail=settings.tail, alpha=settings.alpha)
        if settings.method == "opsd":
            output = opsd.opsd_loss(inputs.student_topk_logp, inputs.teacher_topk_logp, **common)
        else:
            off_policy = dict(is_ratio_clip=settings.is_clip, student_sampled_logp=inputs.logp,
                              old_sampled_logp=inputs.old_logp)
            if settings.method == "sdpo":
                output = sdpo.sdpo_loss(inputs.student_topk_logp, inputs.teacher_topk_logp,
                                        has_teacher_signal=inputs.has_teacher_signal, **common, **off_policy)
            else:
                output = credit.credit_loss(
                    inputs.student_topk_logp, inputs.teacher_topk_logp, inputs.contrastive_topk_logp,
                    has_teacher_signal=inputs.has_teacher_signal, lam=settings.credit_lam, **common, **off_policy,
                )
        per_token, loss_mask, metrics = output.per_token_loss, output.loss_mask, output.metrics
    if inputs.token_weights is not None:  # truncated rollout IS (megacredit/algorithms/rollout_is.py)
        per_token = per_token * inputs.token_weights.to(per_token)
    numerator = aggregate(per_token, loss_mask, settings.loss_agg_mode, global_denominator=1.0)
    denominator = loss_denominator(loss_mask, settings.loss_agg_mode)
    return LossTerms(numerator, denominator, {k: v.detach() for k, v in metrics.items()})


def loss_mask_denominator(settings: ObjectiveSettings, lengths: Sequence[int],
                          has_teacher_signal: Sequence[bool]) -> float:
    """The global denominator of a set of samples, computable on every rank without the model.

    Matches what :func:`micro_batch_loss` counts: distillation methods drop samples without a
    teacher signal (sdpo.validity_mask); OPSD keeps every sample.
    """
    mask = response_mask(lengths)
    if settings.method in ("sdpo", "credit"):
        mask = mask & torch.tensor(list(has_teacher_signal), dtype=torch.bool)[:, None]
    return float(loss_denominator(mask, settings.loss_agg_mode))


def token_advantages(
    settings: ObjectiveSettings,
    seq_adv: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    teacher_sampled_logp: torch.Tensor | None,
    contrastive_sampled_logp: torch.Tensor | None,
    lam: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[B, T] advantages for the PPO-family methods and their diagnostics.

    RLSD's Delta_t = sg(log P_T(y_t) - log P_S(y_t)) (eq. 13) uses the behaviour policy's
    log-prob as P_S (CHOICE: the student that generated y; equal to the current policy on the
    first mini-batch). ``lam`` is the scheduled lambda of this step.
    """
    if settings.method == "grpo":
        return grpo.broadcast_sequence_advantages(seq_adv, mask.to(seq_adv.dtype)) * mask, {}
    if settings.method == "rlsd":
        adv = rlsd.rlsd_token_advantages(seq_adv, teacher_sampled_logp, old_logp, mask, settings.eps_w, lam)
        return adv, rlsd.rlsd_metrics(seq_adv, teacher_sampled_logp, old_logp, mask, settings.eps_w)
    if settings.method == "credit_rlsd":
        adv = credit_rlsd.credit_rlsd_token_advantages(
            seq_adv, teacher_sampled_logp, contrastive_sampled_logp, mask, settings.eps_w, lam)
        return adv, credit_rlsd.credit_rlsd_metrics(
            seq_adv, teacher_sampled_logp, contrastive_sampled_logp, mask, settings.eps_w)
    raise ValueError(f"token_advantages is for {list(PPO_METHODS)}, not {settings.method!r}")
