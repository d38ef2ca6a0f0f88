"""The table of megacredit's methods: what each one needs and computes.

Every place that used to branch on ``algorithm.name`` reads :data:`METHODS` instead: which passes
a step runs (teacher, contrastive), how teacher contexts are built, which ``algorithm.<section>``
config blocks the method reads (and the preset it starts from), its per-token loss, its token
advantages (PPO family) and the evidence its diagnostics report. The generic functions at the
bottom (:func:`micro_batch_loss`, :func:`loss_mask_denominator`, :func:`token_advantages`) are
what the Megatron actor and the trainer call.

Papers: CREDIT (arXiv 2605.11613) Table 3 for the defaults of grpo / sdpo / credit; RLSD
section 5 "Implementation Details" for rlsd's preset.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

from megacredit.algorithms.losses import aggregate, loss_denominator
from megacredit.algorithms.objective import (
    LossTerms,
    MicroBatchInputs,
    ObjectiveSettings,
    PerTokenLoss,
    TokenAdvantages,
    credit_distillation,
    credit_rlsd_evidence_advantages,
    grpo_token_advantages,
    input_specific_evidence,
    opsd_distillation,
    ppo_surrogate,
    response_mask,
    rlsd_evidence,
    rlsd_evidence_advantages,
    sdpo_distillation,
)

ALGORITHM_SECTIONS = ("sdpo", "credit", "rlsd", "teacher")
"""The per-method blocks of ``algorithm:`` in the config (megacredit/config/schema.py)."""


@dataclass(frozen=True)
class Method:
    """One method: its passes, config, loss and advantages."""

    name: str
    """``algorithm.name``."""
    summary: str
    """One line, with the paper and equation."""
    loss: Callable[[ObjectiveSettings, MicroBatchInputs], PerTokenLoss]
    """Per-token loss of a micro-batch (megacredit/algorithms/objective.py)."""
    token_advantages: Callable[..., TokenAdvantages] | None = None
    """PPO family: token advantages computed before the update; None for distillation."""
    teacher_pass: bool = True
    """Runs the self-teacher's forward over the teacher contexts (all but GRPO)."""
    contrastive_pass: bool = False
    """Runs CREDIT's contrastive forwards (other prompts, same response and feedback)."""
    teacher_context: Literal["sdpo", "rlsd"] = "sdpo"
    """How teacher contexts are built (megacredit/data/teacher_context.py): SDPO's (a sibling
    solution or feedback) or RLSD's (the reference answer only)."""
    masks_samples_without_signal: bool = False
    """The loss drops samples whose teacher context has no sibling solution and no feedback."""
    evidence: Callable[..., torch.Tensor] | None = None
    """The sampled-token evidence of an evidence-weighted advantage (diagnostics)."""
    evidence_metric: str | None = None
    """Its metric name in docs/metrics.md."""
    config_sections: frozenset[str] = frozenset()
    """The ``algorithm.<section>`` blocks the method reads; setting another is a config error."""
    ignored_keys: frozenset[str] = frozenset()
    """Keys inside a read section that the method still ignores (setting them is an error)."""
    preset: Mapping[str, Any] = field(default_factory=dict)
    """Dotted-key defaults applied on top of the dataclass defaults (before the user's file)."""

    @property
    def is_ppo(self) -> bool:
        """PPO family: clipped surrogate on group-normalised advantages (needs G >= 2)."""
        return self.token_advantages is not None

    @property
    def distills(self) -> bool:
        """Distillation family: the loss reads the teacher's log-probs on the top-K set."""
        return self.token_advantages is None

    @property
    def schedules_lambda(self) -> bool:
        """Reads RLSD's lambda schedule (algorithm.rlsd.lam)."""
        return "rlsd" in self.config_sections


_RLSD_PRESET: dict[str, Any] = {
    # RLSD section 5 "Implementation Details": eps_low 0.2 / eps_high 0.28, teacher synced
    # with the student every 10 steps and frozen between; eq. 16 averages per sequence.
    "algorithm.clip_eps_high": 0.28,
    "algorithm.loss_agg_mode": "seq-mean-token-mean",
    "algorithm.teacher.kind": "hard_copy",
    "algorithm.teacher.sync_every": 10,
}
_DISTILLATION = frozenset({"sdpo", "teacher"})

METHODS: dict[str, Method] = {method.name: method for method in (
    Method("grpo", "GRPO: group advantages (RLSD eq. 1), clipped surrogate (RLSD eq. 2); CREDIT's baseline",
           loss=ppo_surrogate, token_advantages=grpo_token_advantages, teacher_pass=False),
    Method("sdpo", "SDPO: reverse KL to the self-teacher on its top-K (CREDIT eq. 2)",
           loss=sdpo_distillation, masks_samples_without_signal=True, config_sections=_DISTILLATION),
    Method("credit", "CREDIT: SDPO towards the contrastively tilted teacher (CREDIT eq. 8)",
           loss=credit_distillation, contrastive_pass=True, masks_samples_without_signal=True,
           config_sections=_DISTILLATION | {"credit"}),
    Method("opsd", "OPSD baseline: plain distribution matching to the privileged teacher",
           loss=opsd_distillation, config_sections=_DISTILLATION),
    Method("rlsd", "RLSD: GRPO advantages reweighted by the teacher's evidence (RLSD eq. 13-14, Alg. 1 l. 17)",
           loss=ppo_surrogate, token_advantages=rlsd_evidence_advantages, teacher_context="rlsd",
           evidence=rlsd_evidence, evidence_metric="teacher/rlsd_delta",
           config_sections=frozenset({"rlsd", "teacher"}), preset=_RLSD_PRESET),
    Method("credit_rlsd", "CREDIT-RLSD hybrid: RLSD's update with CREDIT's input-specific evidence S_t",
           loss=ppo_surrogate, token_advantages=credit_rlsd_evidence_advantages, contrastive_pass=True,
           evidence=input_specific_evidence, evidence_metric="teacher/s_t_hybrid",
           config_sections=frozenset({"rlsd", "credit", "teacher"}),
           ignored_keys=frozenset({"algorithm.credit.lam"}), preset=_RLSD_PRESET),
)}
"""Every method, by ``algorithm.name``."""


def get_method(name: str) -> Method:
    """The method called ``name`` (ValueError with the valid names otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"algorithm.name must be one of {list(METHODS)}, got {name!r}.{hint}") from None


# ------------------------------------------------------------------------------ dispatch
def micro_batch_loss(settings: ObjectiveSettings, inputs: MicroBatchInputs) -> LossTerms:
    """Per-token loss of the method, reduced to (numerator, denominator) for global averaging."""
    per_token, loss_mask, metrics = get_method(settings.method).loss(settings, inputs)
    if inputs.token_weights is not None:  # truncated rollout IS (megacredit/algorithms/rollout_is.py)
        per_token = per_token * inputs.token_weights.to(per_token)
    numerator = aggregate(per_token, loss_mask, settings.loss_agg_mode, global_denominator=1.0)
    denominator = loss_denominator(loss_mask, settings.loss_agg_mode)
    return LossTerms(numerator, denominator, {k: v.detach() for k, v in metrics.items()})


def loss_mask_denominator(settings: ObjectiveSettings, lengths: Sequence[int],
                          has_teacher_signal: Sequence[bool]) -> float:
    """The global denominator of a set of samples, computable on every rank without the model.

    Matches what :func:`micro_batch_loss` counts: SDPO and CREDIT drop samples without a teacher
    signal (sdpo.validity_mask); OPSD and the PPO family keep every sample.
    """
    mask = response_mask(lengths)
    if get_method(settings.method).masks_samples_without_signal:
        mask = mask & torch.tensor(list(has_teacher_signal), dtype=torch.bool)[:, None]
    return float(loss_denominator(mask, settings.loss_agg_mode))


def token_advantages(settings: ObjectiveSettings, seq_adv: torch.Tensor, mask: torch.Tensor,
                     old_logp: torch.Tensor, teacher_sampled_logp: torch.Tensor | None,
                     contrastive_sampled_logp: torch.Tensor | None, lam: float) -> TokenAdvantages:
    """[B, T] advantages of a PPO-family method and their diagnostics (``lam``: this step's lambda)."""
    method = get_method(settings.method)
    if method.token_advantages is None:
        raise ValueError(f"token advantages are for the PPO family, not {settings.method!r}")
    return method.token_advantages(settings, seq_adv, mask, old_logp, teacher_sampled_logp,
                                   contrastive_sampled_logp, lam)
