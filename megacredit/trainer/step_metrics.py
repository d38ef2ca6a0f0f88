"""The papers' diagnostics of one step, named as in docs/metrics.md.

``rollout_metrics`` needs only the batch (any rank). ``teacher_metrics`` and
``token_credit_samples`` need the old-policy and teacher pass results, which live on the last
pipeline stage; the loop reduces them across ranks before logging.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from megacredit.algorithms.credit import credit_diagnostics, credit_token_rewards
from megacredit.algorithms.diagnostics import count_privileged_leakage
from megacredit.algorithms.methods import METHODS
from megacredit.algorithms.rlsd import evidence_weights
from megacredit.algorithms.objective import ObjectiveSettings, pad_per_sample, response_mask
from megacredit.trainer.rollout import RolloutBatch


def rollout_metrics(batch: RolloutBatch, group_size: int) -> dict[str, float]:
    """rollout/: reward, length, truncation, all-correct / all-wrong groups, leakage."""
    rewards = torch.tensor(batch.rewards, dtype=torch.float64)
    lengths = torch.tensor([len(ids) for ids in batch.response_ids], dtype=torch.float64)
    groups = rewards.view(-1, group_size)
    return {
        "rollout/reward_mean": rewards.mean().item(),
        "rollout/reward_std": rewards.std(correction=0).item(),
        "rollout/response_length_mean": lengths.mean().item(),
        "rollout/response_length_max": lengths.max().item(),
        "rollout/truncated_frac": sum(r == "length" for r in batch.finish_reasons) / len(batch),
        "rollout/group_all_correct_frac": (groups >= 1.0).all(dim=1).double().mean().item(),
        "rollout/group_all_wrong_frac": (groups <= 0.0).all(dim=1).double().mean().item(),
        "rollout/leakage_count": float(count_privileged_leakage(batch.response_texts)),
    }


def sampled_token_tensors(indices: Sequence[int], student: dict, teacher: dict):
    """[B, T] student/teacher sampled log-probs, [C, B, T] contrastive ones, and the mask.

    Without teacher results (GRPO) the teacher tensor is None; without contrastive passes
    (C = 0) the contrastive tensor is None.
    """
    lengths = [len(student[i].sampled_logp) for i in indices]
    mask = response_mask(lengths)
    student_logp = pad_per_sample([student[i].sampled_logp.float().cpu() for i in indices])
    if not teacher:
        return mask, student_logp, None, None
    teacher_logp = pad_per_sample([teacher[i].sampled_logp.float().cpu() for i in indices])
    num_contrastive = teacher[indices[0]].contrastive_sampled_logp.shape[0]
    contrastive = torch.stack([
        pad_per_sample([teacher[i].contrastive_sampled_logp[c].float().cpu() for i in indices])
        for c in range(num_contrastive)
    ]) if num_contrastive else None
    return mask, student_logp, teacher_logp, contrastive


def credit_series(settings: ObjectiveSettings | None, seq_adv: torch.Tensor | None, mask: torch.Tensor, signal_mask: torch.Tensor,
                  student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                  contrastive: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """[B, T] per-token series of the method's own credit, for the token-credit page.

    ``r_t`` (CREDIT only): R_t(y_t) = f_t[y_t] - (lambda / C) sum_k g_{k,t}[y_t] - log pi_theta(y_t)
    (CREDIT eq. 8 at the sampled token; 0 on samples without a teacher signal, like Delta V_t).
    ``rlsd_weight`` (rlsd, credit_rlsd): clip(w_t, 1 - eps_w, 1 + eps_w) with w_t = exp(sign(A) Delta_t)
    (RLSD eq. 14 and Algorithm 1 line 17; the hybrid uses S_t as the evidence), the factor that
    multiplies A (through lambda) in A_hat_t; masked positions hold 1.
    """
    series: dict[str, torch.Tensor] = {}
    if settings is None:
        return series
    method = METHODS[settings.method]
    if method.distills and method.contrastive_pass and contrastive is not None:
        rewards = credit_token_rewards(teacher_logp, contrastive, student_logp, settings.credit_lam)
        series["r_t"] = torch.where(signal_mask, rewards, torch.zeros_like(rewards))
    if method.evidence is not None and seq_adv is not None:
        evidence = method.evidence(teacher_logp, student_logp, contrastive)
        series["rlsd_weight"] = evidence_weights(seq_adv, evidence, mask, settings.eps_w)[1]
    return series


def teacher_metrics(indices: Sequence[int], student: dict, teacher: dict,
                    has_signal: Sequence[bool], settings: ObjectiveSettings | None = None,
                    seq_adv: torch.Tensor | None = None, correct: Sequence[bool] | None = None,
                    ) -> tuple[dict[str, float], dict[int, dict[str, list[float]]]]:
    """teacher/: S_t, Delta V_t, their sequence sums, contrastive std, top-K entropy.

    Returns the metric means (as sums and counts, so ranks can be combined exactly) and the
    per-token S_t / Delta V_t of every sample (for the token-credit page), plus R_t / the RLSD
    weight of :func:`credit_series` when ``settings`` (ObjectiveSettings) and ``seq_adv`` (the
    [B] GRPO advantages of ``indices``) are given.
    """
    if not indices:
        return {}, {}
    mask, student_logp, teacher_logp, contrastive = sampled_token_tensors(indices, student, teacher)
    signal_mask = mask & torch.tensor(list(has_signal), dtype=torch.bool)[:, None]
    # With C = 0 the contrastive mean is taken as 0, so S_t reduces to f_t[y_t] (not reported).
    baseline = contrastive if contrastive is not None else torch.zeros_like(teacher_logp)[None]
    diag = credit_diagnostics(teacher_logp, baseline, student_logp, signal_mask)
    tokens, sequences = signal_mask.sum().item(), signal_mask.any(dim=1).sum().item()
    sums = {
        "teacher/delta_v": (diag.realized_delta_v.sum().item(), tokens),
        "teacher/seq_pmi": (diag.realized_delta_v_sum.sum().item(), sequences),
        "teacher/signal_frac": (float(sum(has_signal)), len(indices)),
    }
    if correct is not None:  # does the teacher know more than the student? (docs/metrics.md)
        for name, rows in (("correct", torch.tensor(list(correct))), ("incorrect", ~torch.tensor(list(correct)))):
            split = signal_mask & rows[:, None]
            sums[f"teacher/delta_v_{name}"] = (diag.realized_delta_v[split].sum().item(), split.sum().item())
    if contrastive is not None:
        sums["teacher/s_t"] = (diag.input_specific_signal.sum().item(), tokens)
        sums["teacher/seq_s"] = (diag.input_specific_signal_sum.sum().item(), sequences)
        sums["teacher/contrastive_std"] = (diag.contrastive_std.sum().item(), tokens)
    series = {"delta_v": diag.realized_delta_v}
    if contrastive is not None:
        series["s_t"] = diag.input_specific_signal
    series.update(credit_series(settings, seq_adv, mask, signal_mask, student_logp, teacher_logp, contrastive))
    lengths = mask.sum(dim=1).tolist()
    per_token = {index: {name: values[row, : lengths[row]].tolist() for name, values in series.items()}
                 for row, index in enumerate(indices)}
    return sums, per_token


def entropy_sums(indices: Sequence[int], student: dict) -> dict[str, tuple[float, float]]:
    """train/entropy: entropy of the policy renormalised on its top-K set (a lower bound proxy
    of the full-vocabulary entropy, which is never materialised), as (sum, count)."""
    total, count = 0.0, 0
    for index in indices:
        logp = torch.log_softmax(student[index].topk_logp.float(), dim=-1)
        total += float(-(logp.exp() * logp).sum())
        count += logp.shape[0]
    return {"train/entropy": (total, count)} if count else {}


def combine_sums(parts: Sequence[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """Exact means from per-rank (sum, count) pairs."""
    totals: dict[str, list[float]] = {}
    for part in parts:
        for name, (value, count) in part.items():
            slot = totals.setdefault(name, [0.0, 0.0])
            slot[0] += value
            slot[1] += count
    return {name: value / count for name, (value, count) in totals.items() if count}


def token_credit_samples(batch: RolloutBatch, tokenizer: Any, per_token: dict[int, dict[str, list[float]]],
                         advantages: dict[int, list[float]], count: int) -> list[dict[str, Any]]:
    """A few samples with per-token credit series, for token_credit.jsonl / the HTML page."""
    samples = []
    for index in sorted(per_token)[:count]:
        series = dict(per_token[index])
        if index in advantages:
            series["advantage"] = advantages[index]
        samples.append({
            "tokens": [tokenizer.decode([t]) for t in batch.response_ids[index]],
            "token_ids": list(batch.response_ids[index]),
            **series,
            "reward": batch.rewards[index],
            "prompt": batch.records[index].get("prompt", ""),
            "feedback": batch.feedbacks[index],
        })
    return samples
