"""The methods of megacredit as pure, Megatron-free torch functions (issue 3).

One module per method, each citing the papers' equations (CREDIT, arXiv 2605.11613; RLSD,
"Self-Distilled RLVR", Yang et al.):

* :mod:`.grpo`        group advantages (RLSD eq. 1), clipped surrogate (RLSD eq. 2)
* :mod:`.sdpo`        top-K self-distillation divergence and loss (CREDIT section 2, eq. 2)
* :mod:`.credit`      contrastive rewards R_t(v) (CREDIT eq. 8), tilted-teacher loss, diagnostics
* :mod:`.rlsd`        evidence-weighted token advantages (RLSD eq. 13-14, Algorithm 1 line 17)
* :mod:`.credit_rlsd` RLSD weight built from CREDIT's input-specific evidence S_t (hybrid)
* :mod:`.opsd`        plain distribution matching to a privileged teacher (baseline)
* :mod:`.losses`      masking and token-mean / seq-mean-token-mean aggregation (RLSD eq. 2/16)
* :mod:`.schedules`   lambda schedules (RLSD: 0.5 -> 0 over 50 steps)
* :mod:`.diagnostics` privileged-information leakage counter (RLSD section 3.1)
* :mod:`.topk`        vocab-parallel top-K log-probs feeding the [..., K] inputs above
"""

from megacredit.algorithms.credit import (
    CreditDiagnostics,
    credit_diagnostics,
    credit_loss,
    credit_token_rewards,
    tilted_teacher_bins,
)
from megacredit.algorithms.credit_rlsd import credit_rlsd_metrics, credit_rlsd_token_advantages
from megacredit.algorithms.diagnostics import (
    DEFAULT_LEAKAGE_PHRASES,
    LeakageReport,
    count_privileged_leakage,
    leakage_report,
)
from megacredit.algorithms.grpo import group_advantages, ppo_clip_loss
from megacredit.algorithms.losses import AGGREGATION_MODES, aggregate, loss_denominator, masked_mean
from megacredit.algorithms.opsd import opsd_loss
from megacredit.algorithms.rlsd import rlsd_metrics, rlsd_token_advantages
from megacredit.algorithms.schedules import LambdaSchedule
from megacredit.algorithms.sdpo import DistillationLossOutput, sdpo_loss, topk_divergence

__all__ = [
    "AGGREGATION_MODES",
    "CreditDiagnostics",
    "DEFAULT_LEAKAGE_PHRASES",
    "DistillationLossOutput",
    "LambdaSchedule",
    "LeakageReport",
    "aggregate",
    "count_privileged_leakage",
    "credit_diagnostics",
    "credit_loss",
    "credit_rlsd_metrics",
    "credit_rlsd_token_advantages",
    "credit_token_rewards",
    "group_advantages",
    "leakage_report",
    "loss_denominator",
    "masked_mean",
    "opsd_loss",
    "ppo_clip_loss",
    "rlsd_metrics",
    "rlsd_token_advantages",
    "sdpo_loss",
    "tilted_teacher_bins",
    "topk_divergence",
]
