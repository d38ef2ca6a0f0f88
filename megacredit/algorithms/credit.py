"""CREDIT: contrastive reward from distillation (CREDIT section 3.3, Algorithm 1, eq. 8).

Algorithm 1 lines 4-6, for every vocabulary token v of the top-K set at position t:
    f_t      = log pi_ref(. | x_i,   y<t, z_i)      (1 teacher pass)
    g_{k,t}  = log pi_ref(. | x'_k,  y<t, z_i)      (C contrastive passes, x'_k != x_i)
    R_t(v)   = f_t[v] - (lambda / C) sum_k g_{k,t}[v] - log pi_theta(v | x_i, y<t)     (eq. 8)
lambda = 0 recovers the SDPO reward r_t(v) of eq. 2. Line 8: update pi_theta "via reverse-KL
gradient using R_t(v) as vocabulary-level advantages".

Equivalent loss (the identity this module relies on; derived here, tested in float64):
let s(v) = pi_theta(v) / sum_{u in K} pi_theta(u) be the student renormalised on the top-K set
and q(v) = exp(f_t[v] - lambda mean_k g_{k,t}[v]) / Z_q the TILTED teacher on the same set.
Then log s(v) - log q(v) = -R_t(v) + c_t with c_t = log Z_q - log sum_K pi_theta independent of
v, and because sum_v s(v) grad log s(v) = grad sum_v s(v) = 0,
    grad KL(s || sg q) = -sum_{v in K} s(v) R_t(v) grad log s(v)
                       = -sum_{v in K} s(v) (R_t(v) - Rbar_t) grad log pi_theta(v | x, y<t),
    Rbar_t = sum_{u in K} s(u) R_t(u)   (R_t held constant, i.e. as stop-gradient advantages).
So the reverse-KL step to q is the policy gradient with advantages R_t(v) over the top-K set,
with the s-weighted mean reward as baseline (the renormalisation on K induces it). When K is
the whole vocabulary s = pi_theta and the baseline term is zero: -sum_v pi(v) R_t(v) grad log pi(v).

CHOICE (the paper states eq. 8 for reverse KL on the renormalised top-K only) for JSD (alpha != 1) and for the tail bin: the tilted q is used as the
teacher distribution of the same divergence SDPO uses. With ``tail=True`` the tilt is applied
to the (K+1)-bin distributions: q_b ∝ exp(Tbin_b - lambda mean_k Gbin_{k,b}) over the K ids and
the tail bin, where Tbin / Gbin_k are the teacher / contrastive top-K log-probs plus their own
tail bins log(1 - sum_K p). With lambda = 0 the tilted teacher IS the SDPO teacher (same
tensor, no re-normalisation), so ``credit_loss(lam=0)`` equals ``sdpo_loss`` bitwise.

Diagnostics on the SAMPLED token y_t (which may lie outside the top-K set, hence separate
[B, T] inputs gathered at y_t): S_t = f_t[y_t] - mean_k g_{k,t}[y_t] (input-specific signal,
eq. 6 with the C-sample estimate of G_t; paper: starts near 0.18), realised
Delta V_t = r_t(y_t) = f_t[y_t] - log pi_theta(y_t | x, y<t) (section 3.1), and their sequence
sums (eq. 4: sum_t Delta V_t = pMI under Assumption 1; the sum of R_t(y_t) obeys eq. 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megacredit.algorithms.losses import check_mask_2d, check_same_shape, masked_mean, zero_masked
from megacredit.algorithms.sdpo import (
    DistillationLossOutput,
    check_topk_inputs,
    distillation_loss_on_bins,
    fill_invalid_positions,
    kl_divergence,
    topk_bins,
    topk_mass_metrics,
    validity_mask,
)


def check_contrastive_shape(contrastive: torch.Tensor, teacher: torch.Tensor, name: str) -> None:
    """Contrastive passes are stacked on a leading C axis: [C, *teacher.shape]."""
    if contrastive.dim() != teacher.dim() + 1 or tuple(contrastive.shape[1:]) != tuple(teacher.shape):
        raise ValueError(
            f"{name} must be [C, {', '.join(map(str, teacher.shape))}] (C contrastive passes "
            f"stacked on dim 0, same positions and ids as the teacher), got {tuple(contrastive.shape)}"
        )
    if contrastive.shape[0] < 1:
        raise ValueError(f"{name} needs at least one contrastive pass (C >= 1)")


def check_lambda(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:  # section 3.3: "a coefficient lambda in [0, 1]"
        raise ValueError(f"CREDIT lambda must be in [0, 1] (paper default 0.1, 0 = SDPO), got {lam}")


def credit_token_rewards(
    teacher_logp: torch.Tensor,
    contrastive_logp: torch.Tensor,
    student_logp: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """Eq. 8: R_t(v) = f_t[v] - (lambda / C) sum_k g_{k,t}[v] - log pi_theta(v | x, y<t).

    Args:
        teacher_logp: [..., K] f_t at the K ids (normalised full-vocabulary log-probs).
        contrastive_logp: [C, ..., K] g_{k,t} at the same ids, one slice per contrastive prompt.
        student_logp: [..., K] log pi_theta at the same ids.
        lam: debiasing strength lambda in [0, 1].

    Returns:
        [..., K] R_t(v), detached: vocabulary-level advantages are stop-gradient (Algorithm 1).
    """
    check_same_shape("teacher_logp", teacher_logp, student_logp=student_logp)
    check_contrastive_shape(contrastive_logp, teacher_logp, "contrastive_logp")
    check_lambda(lam)
    generic_baseline = contrastive_logp.mean(dim=0)  # G_hat_t(v), eq. 8's (1/C) sum_k g_{k,t}[v]
    return (teacher_logp - lam * generic_baseline - student_logp).detach()


def tilted_teacher_bins(
    teacher_topk_logp: torch.Tensor, contrastive_topk_logp: torch.Tensor, lam: float, tail: bool
) -> torch.Tensor:
    """Normalised log q over the top-K bins, q ∝ exp(f - lambda mean_k g) (module docstring).

    ``lam == 0`` returns the SDPO teacher bins unchanged (bitwise SDPO equivalence).
    """
    teacher_bins = topk_bins(teacher_topk_logp, tail)
    if lam == 0.0:
        return teacher_bins
    contrastive_bins = topk_bins(contrastive_topk_logp, tail)  # [C, ..., K(+1)]
    tilted_logits = teacher_bins - lam * contrastive_bins.mean(dim=0)
    return tilted_logits - torch.logsumexp(tilted_logits, dim=-1, keepdim=True)


def credit_loss(
    student_topk_logp: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    contrastive_topk_logp: torch.Tensor,
    mask: torch.Tensor,
    has_teacher_signal: torch.Tensor | None,
    lam: float = 0.1,
    alpha: float = 1.0,
    tail: bool = False,
    is_ratio_clip: float | None = None,
    student_sampled_logp: torch.Tensor | None = None,
    old_sampled_logp: torch.Tensor | None = None,
) -> DistillationLossOutput:
    """CREDIT per-token loss: SDPO's divergence with the tilted teacher q (Algorithm 1 line 8).

    Args:
        student_topk_logp: [B, T, K] log pi_theta(v | x_i, y<t) at the K ids (with gradient).
        teacher_topk_logp: [B, T, K] f_t = log pi_ref(v | x_i, y<t, z_i) at the same ids.
        contrastive_topk_logp: [C, B, T, K] g_{k,t} = log pi_ref(v | x'_k, y<t, z_i), same ids.
        mask, has_teacher_signal, alpha, tail, is_ratio_clip, student_sampled_logp,
            old_sampled_logp: exactly as in :func:`megacredit.algorithms.sdpo.sdpo_loss`.
        lam: lambda of eq. 8 (paper default 0.1; 0 reproduces SDPO exactly).

    Returns:
        :class:`DistillationLossOutput`, plus the metric ``tilt_kl_mean`` = KL(teacher || q)
        (how far the contrastive baseline moved the target).
    """
    check_topk_inputs(mask, student_topk_logp=student_topk_logp, teacher_topk_logp=teacher_topk_logp)
    check_contrastive_shape(contrastive_topk_logp, teacher_topk_logp, "contrastive_topk_logp")
    check_lambda(lam)
    valid = validity_mask(mask, has_teacher_signal)
    student_bins = topk_bins(fill_invalid_positions(student_topk_logp, valid), tail)
    teacher_topk = fill_invalid_positions(teacher_topk_logp.detach(), valid)
    contrastive_topk = fill_invalid_positions(contrastive_topk_logp.detach(), valid)
    tilted_bins = tilted_teacher_bins(teacher_topk, contrastive_topk, lam, tail)
    output = distillation_loss_on_bins(
        student_bins, tilted_bins, valid, alpha, is_ratio_clip, student_sampled_logp, old_sampled_logp
    )
    output.metrics.update(topk_mass_metrics(valid, student=student_topk_logp, teacher=teacher_topk_logp))
    with torch.no_grad():
        tilt_kl = kl_divergence(topk_bins(teacher_topk, tail), tilted_bins)
        output.metrics["tilt_kl_mean"] = masked_mean(tilt_kl, valid)
    return output


@dataclass
class CreditDiagnostics:
    """Sampled-token diagnostics of CREDIT (section 3.2-3.4); all detached, 0 where masked."""

    input_specific_signal: torch.Tensor
    """[B, T] S_t = f_t[y_t] - mean_k g_{k,t}[y_t] (eq. 6 with the C-sample baseline)."""
    realized_delta_v: torch.Tensor
    """[B, T] Delta V_t = r_t(y_t) = f_t[y_t] - log pi_theta(y_t | x, y<t) (eq. 2 at y_t)."""
    input_specific_signal_sum: torch.Tensor
    """[B] sum_t S_t over valid positions."""
    realized_delta_v_sum: torch.Tensor
    """[B] sum_t Delta V_t over valid positions (eq. 4: = pMI under Assumption 1)."""
    contrastive_std: torch.Tensor
    """[B, T] population std over the C passes of g_{k,t}[y_t] (0 when C = 1)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """0-dim masked means: S_t, Delta V_t, their sequence sums, contrastive std."""


def credit_diagnostics(
    teacher_sampled_logp: torch.Tensor,
    contrastive_sampled_logp: torch.Tensor,
    student_sampled_logp: torch.Tensor,
    mask: torch.Tensor,
) -> CreditDiagnostics:
    """S_t, realised Delta V_t and their sums from log-probs of the SAMPLED tokens.

    Args:
        teacher_sampled_logp: [B, T] f_t[y_t] = log pi_ref(y_t | x_i, y<t, z_i).
        contrastive_sampled_logp: [C, B, T] g_{k,t}[y_t] = log pi_ref(y_t | x'_k, y<t, z_i).
        student_sampled_logp: [B, T] log pi_theta(y_t | x_i, y<t).
        mask: [B, T] valid positions (response tokens of samples with a teacher signal).
    """
    check_mask_2d(mask)
    check_same_shape("mask", mask, teacher_sampled_logp=teacher_sampled_logp, student_sampled_logp=student_sampled_logp)
    check_contrastive_shape(contrastive_sampled_logp, teacher_sampled_logp, "contrastive_sampled_logp")
    with torch.no_grad():
        valid = mask.to(torch.bool)
        signal = zero_masked(teacher_sampled_logp - contrastive_sampled_logp.mean(dim=0), valid)
        delta_v = zero_masked(teacher_sampled_logp - student_sampled_logp, valid)
        spread = zero_masked(contrastive_sampled_logp.std(dim=0, correction=0), valid)
        has_tokens = valid.any(dim=-1)
        metrics = {
            "input_specific_signal_mean": masked_mean(signal, valid),
            "realized_delta_v_mean": masked_mean(delta_v, valid),
            "input_specific_signal_seq_sum_mean": masked_mean(signal.sum(-1), has_tokens),
            "realized_delta_v_seq_sum_mean": masked_mean(delta_v.sum(-1), has_tokens),
            "contrastive_std_mean": masked_mean(spread, valid),
        }
    return CreditDiagnostics(signal, delta_v, signal.sum(-1), delta_v.sum(-1), spread, metrics)
