"""GRPO: group-relative advantages and the clipped surrogate (the baseline of both papers).

RLSD eq. 1:   A^(i) = (R(x, y^(i)) - mu_G) / sigma_G
RLSD eq. 2:   L_GRPO = E[ 1/G sum_i 1/|y^(i)| sum_t min(rho_t A^(i), clip(rho_t, 1-eps, 1+eps) A^(i)) ]
              rho_t = pi_theta(y_t | x, y<t) / pi_old(y_t | x, y<t)

CHOICE (std): sigma_G is the UNBIASED sample standard deviation (Bessel's correction, divide
by G - 1), i.e. ``torch.std`` with its default ``correction=1``, exactly what verl's
``compute_grpo_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``) uses; both papers
train with verl (CREDIT Table 3: "verl"; RLSD section 5.1: "VERL and EasyR1"). An ``eps`` is
added to sigma_G (``(R - mu)/(sigma + eps)``) so that groups with identical rewards give
advantage exactly 0 instead of NaN.

Clipped surrogate: as in DAPO (arXiv:2503.14476, "Clip-Higher") and RLSD, the clip range may
be asymmetric ``[1 - eps_low, 1 + eps_high]`` (CREDIT: 0.2 / 0.2, RLSD: 0.2 / 0.28). No KL
penalty, no entropy bonus (both papers). The per-token loss to MINIMISE is ``pg_loss =
max(-A rho, -A clip(rho))``, the negation of the min in eq. 2; aggregate it with
:func:`megacredit.algorithms.losses.aggregate`.
"""

from __future__ import annotations

import torch

from megacredit.algorithms.losses import check_mask_2d, check_same_shape, masked_mean, zero_masked

# log(rho) is clamped to this range before exp, as verl's compute_policy_loss_vanilla does, so
# that a stale token cannot overflow the ratio to inf (exp(20) ~ 4.9e8 is already far outside any clip range).
LOG_RATIO_CLAMP = 20.0


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_by_std: bool = True
) -> torch.Tensor:
    """RLSD eq. 1: per-sample ``(R_i - mean_G) / (std_G + eps)`` for contiguous groups.

    Args:
        rewards: [N] scalar rewards, the G rollouts of each prompt stored contiguously
            (rows ``g*G .. g*G + G - 1`` belong to prompt g).
        group_size: G >= 2 (rollouts per prompt); N must be a multiple of G.
        eps: added to the unbiased group std (see the module docstring, CHOICE).
        normalize_by_std: False gives the mean-centred variant ``R_i - mean_G`` (Dr. GRPO).

    Returns:
        [N] advantages in the dtype of ``rewards`` (float32 when ``rewards`` is integer/bool).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (GRPO needs several rollouts per prompt to form a "
            f"baseline), got {group_size}"
        )
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
            f"store the G rollouts of every prompt contiguously"
        )
    values = rewards if rewards.is_floating_point() else rewards.to(torch.float32)
    grouped = values.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if normalize_by_std:
        centred = centred / (grouped.std(dim=-1, keepdim=True, correction=1) + eps)
    return centred.reshape(-1)


def broadcast_sequence_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] sequence advantages -> [B, T] (GRPO gives every token the same A); [B, T] passes."""
    if advantages.dim() == 1:
        if advantages.shape[0] != like.shape[0]:
            raise ValueError(
                f"advantages [B] has B={advantages.shape[0]} but the log-probs have B={like.shape[0]}"
            )
        return advantages.unsqueeze(-1).expand_as(like)
    check_same_shape("logp", like, advantages=advantages)
    return advantages


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate loss (negated RLSD eq. 2 integrand) and its metrics.

    Args:
        logp: [B, T] log pi_theta(y_t | x, y<t) of the sampled tokens (carries the gradient).
        old_logp: [B, T] log pi_old of the same tokens (the rollout/behaviour policy; detached).
        advantages: [B] sequence advantages (broadcast over tokens) or [B, T] token advantages
            (e.g. RLSD's A_hat_t, a drop-in replacement, RLSD section 4.2). Detached.
        mask: [B, T] valid response tokens.
        clip_eps_low, clip_eps_high: clip range ``[1 - clip_eps_low, 1 + clip_eps_high]``.
        dual_clip_c: None (off) or the dual-clip bound c > 1 (arXiv:1912.09729) of verl's
            ``verl/trainer/ppo/core_algos.py::compute_policy_loss_vanilla`` (``clip_ratio_c``,
            default 3.0, which the trainer's ``algorithm.dual_clip_c`` also defaults to; neither
            paper names it): for A < 0 the loss is capped at ``-A * c``, so a huge ratio on a
            negative-advantage token cannot blow up.

    Returns:
        ``pg_loss`` [B, T] (0 at masked positions) and metrics (0-dim detached tensors, masked
        means over this batch): ``clip_fraction`` (share of tokens whose clipped branch is the
        active one, i.e. no gradient), ``ppo_kl`` (k1 estimate mean(old_logp - logp), verl's
        name) and ``approx_kl`` (k3 estimate mean(rho - 1 - log rho) >= 0 of KL(old || new)),
        ``ratio_mean``.
    """
    check_mask_2d(mask)
    check_same_shape("mask", mask, logp=logp, old_logp=old_logp)
    if not (0.0 <= clip_eps_low < 1.0) or clip_eps_high < 0.0:
        raise ValueError(
            f"clip range needs 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got "
            f"clip_eps_low={clip_eps_low}, clip_eps_high={clip_eps_high}"
        )
    token_advantages = broadcast_sequence_advantages(advantages, logp).detach()
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    clip_coef = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    unclipped_loss = -token_advantages * ratio
    clipped_loss = -token_advantages * clip_coef
    pg_loss = torch.maximum(unclipped_loss, clipped_loss)
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (verl uses 3.0) or None, got {dual_clip_c}")
        capped = torch.minimum(pg_loss, -token_advantages * dual_clip_c)
        pg_loss = torch.where(token_advantages < 0, capped, pg_loss)
    pg_loss = zero_masked(pg_loss, mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped_loss > unclipped_loss).to(logp.dtype), mask),
            "ppo_kl": masked_mean(-log_ratio, mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return pg_loss, metrics
