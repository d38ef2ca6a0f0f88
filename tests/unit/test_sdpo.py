"""SDPO top-K divergence and loss vs a plain full-vocabulary float64 computation.

Tolerances: float64 values and gradients 1e-10 (absolute + relative) against the
probability-space reference in algorithms_reference.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from algorithms_reference import (
    divergence,
    log_probs_at,
    random_logits,
    restricted_distribution,
    softmax_probs,
    topk_ids,
)
from megacredit.algorithms.losses import aggregate
from megacredit.algorithms.opsd import opsd_loss
from megacredit.algorithms.sdpo import sdpo_loss, topk_divergence

TOL = dict(atol=1e-10, rtol=1e-10)
VOCAB, K = 11, 4


def _student_teacher(seed: int, shape=(2, 3)):
    student_logits = random_logits(*shape, VOCAB, seed=seed).requires_grad_(True)
    teacher_logits = random_logits(*shape, VOCAB, seed=seed + 100)
    return student_logits, teacher_logits


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("topk_source", ["teacher", "student"])
def test_topk_divergence_matches_full_vocabulary_reference(alpha, tail, topk_source):
    student_logits, teacher_logits = _student_teacher(seed=1)
    ids = topk_ids(teacher_logits if topk_source == "teacher" else student_logits.detach(), K)

    ours = topk_divergence(log_probs_at(student_logits, ids), log_probs_at(teacher_logits, ids), alpha, tail)
    reference = divergence(
        restricted_distribution(softmax_probs(student_logits), ids, tail),
        restricted_distribution(softmax_probs(teacher_logits), ids, tail),
        alpha,
    )
    torch.testing.assert_close(ours, reference, **TOL)

    weights = random_logits(2, 3, seed=7)  # a generic linear functional of the per-token values
    (grad_ours,) = torch.autograd.grad((weights * ours).sum(), student_logits)
    (grad_reference,) = torch.autograd.grad((weights * reference).sum(), student_logits)
    torch.testing.assert_close(grad_ours, grad_reference, **TOL)


def test_full_vocabulary_top_k_is_the_plain_kl():
    student_logits, teacher_logits = _student_teacher(seed=2)
    ids = topk_ids(teacher_logits, VOCAB)
    ours = topk_divergence(log_probs_at(student_logits, ids), log_probs_at(teacher_logits, ids), 1.0)
    p, q = softmax_probs(student_logits), softmax_probs(teacher_logits)
    torch.testing.assert_close(ours, (p * (p / q).log()).sum(-1), **TOL)


def test_jsd_endpoints_are_the_scaled_limits_of_the_kls():
    student_logits, teacher_logits = _student_teacher(seed=3)
    ids = topk_ids(teacher_logits, K)
    s, t = log_probs_at(student_logits, ids).detach(), log_probs_at(teacher_logits, ids)
    forward_kl, reverse_kl = topk_divergence(s, t, 0.0), topk_divergence(s, t, 1.0)
    small = 1e-6
    # JSD_a / a -> KL(T||S) as a -> 0; JSD_a / (1 - a) -> KL(S||T) as a -> 1; error O(a).
    torch.testing.assert_close(topk_divergence(s, t, small) / small, forward_kl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(topk_divergence(s, t, 1 - small) / small, reverse_kl, atol=1e-4, rtol=1e-4)
    assert (forward_kl - reverse_kl).abs().max() > 1e-2  # the two KLs differ, so the check can fail


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_divergence_is_zero_for_identical_and_positive_for_different(alpha):
    _, teacher_logits = _student_teacher(seed=4)
    ids = topk_ids(teacher_logits, K)
    t = log_probs_at(teacher_logits, ids)
    torch.testing.assert_close(topk_divergence(t, t, alpha, tail=True), torch.zeros(2, 3, dtype=t.dtype), **TOL)
    shifted = log_probs_at(teacher_logits + random_logits(2, 3, VOCAB, seed=5), ids)
    assert (topk_divergence(shifted, t, alpha) > 0).all()


def test_sdpo_loss_masks_samples_without_teacher_signal_and_padding():
    student_logits, teacher_logits = _student_teacher(seed=6, shape=(3, 4))
    ids = topk_ids(teacher_logits, K)
    student = log_probs_at(student_logits, ids)
    teacher = log_probs_at(teacher_logits, ids).clone()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    teacher[0, 3] = float("nan")  # padding garbage must not reach values or gradients
    has_signal = torch.tensor([True, False, True])

    out = sdpo_loss(student, teacher, mask, has_signal, alpha=1.0)

    expected_mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=out.loss_mask.dtype)
    torch.testing.assert_close(out.loss_mask, expected_mask)
    per_token_reference = divergence(
        restricted_distribution(softmax_probs(student_logits), ids, False),
        restricted_distribution(softmax_probs(teacher_logits), ids, False),
        1.0,
    )
    valid = expected_mask.bool()
    torch.testing.assert_close(out.per_token_loss[valid], per_token_reference[valid].detach(), **TOL)
    assert (out.per_token_loss[~valid] == 0).all()
    loss = aggregate(out.per_token_loss, out.loss_mask, "token-mean")
    torch.testing.assert_close(loss, per_token_reference[valid].mean(), **TOL)
    (grad,) = torch.autograd.grad(loss, student_logits)
    assert torch.isfinite(grad).all()
    assert (grad[1] == 0).all() and (grad[0, 3] == 0).all()  # no signal / padding: no gradient
    assert out.metrics["teacher_signal_fraction"].item() == pytest.approx(2 / 3)


def test_off_policy_importance_weight_follows_the_is_clip_rule():
    student_logits, teacher_logits = _student_teacher(seed=8, shape=(1, 3))
    ids = topk_ids(teacher_logits, K)
    student, teacher = log_probs_at(student_logits, ids), log_probs_at(teacher_logits, ids)
    mask = torch.ones(1, 3)
    sampled = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)  # ratios e^0.5, e^-1, 1
    plain = sdpo_loss(student, teacher, mask, None)
    weighted = sdpo_loss(student, teacher, mask, None, is_ratio_clip=1.5, student_sampled_logp=sampled, old_sampled_logp=old)
    expected_weights = torch.tensor([[1.5, math.exp(-1.0), 1.0]], dtype=torch.float64)  # e^0.5 = 1.65 > 1.5
    torch.testing.assert_close(weighted.per_token_loss, plain.per_token_loss * expected_weights, **TOL)
    assert weighted.metrics["is_clip_fraction"].item() == pytest.approx(1 / 3)
    # the weight is detached: no gradient reaches the sampled-token log-probs
    assert weighted.per_token_loss.requires_grad
    assert torch.autograd.grad(weighted.per_token_loss.sum(), sampled, allow_unused=True)[0] is None
    with pytest.raises(ValueError, match="student_sampled_logp"):
        sdpo_loss(student, teacher, mask, None, is_ratio_clip=2.0)


def test_teacher_is_stop_gradient_in_the_loss():
    student_logits, teacher_logits = _student_teacher(seed=9)
    teacher_logits.requires_grad_(True)
    ids = topk_ids(teacher_logits.detach(), K)
    out = sdpo_loss(log_probs_at(student_logits, ids), log_probs_at(teacher_logits, ids), torch.ones(2, 3), None, alpha=0.5)
    grad = torch.autograd.grad(out.per_token_loss.sum(), teacher_logits, allow_unused=True)[0]
    assert grad is None or (grad == 0).all()


def test_bfloat16_inputs_are_computed_in_float32():
    student_logits, teacher_logits = _student_teacher(seed=10)
    ids = topk_ids(teacher_logits, K)
    student, teacher = log_probs_at(student_logits, ids).detach(), log_probs_at(teacher_logits, ids)
    low = topk_divergence(student.bfloat16(), teacher.bfloat16(), 1.0)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), topk_divergence(student, teacher, 1.0), atol=3e-2, rtol=3e-2)


def test_opsd_is_reverse_kl_on_every_sample():
    student_logits, teacher_logits = _student_teacher(seed=11)
    ids = topk_ids(teacher_logits, K)
    student, teacher = log_probs_at(student_logits, ids), log_probs_at(teacher_logits, ids)
    out = opsd_loss(student, teacher, torch.ones(2, 3))
    reference = divergence(
        restricted_distribution(softmax_probs(student_logits), ids, False),
        restricted_distribution(softmax_probs(teacher_logits), ids, False),
        1.0,
    )
    torch.testing.assert_close(out.per_token_loss, reference, **TOL)


def test_bad_inputs_raise_clear_errors():
    t = torch.randn(2, 3, K).log_softmax(-1)
    with pytest.raises(ValueError, match="alpha"):
        topk_divergence(t, t, 1.5)
    with pytest.raises(ValueError, match="teacher_topk_logp"):
        sdpo_loss(t, t[:, :2], torch.ones(2, 3), None)
    with pytest.raises(ValueError, match="has_teacher_signal"):
        sdpo_loss(t, t, torch.ones(2, 3), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_tail_divergence_gradcheck(alpha):
    """torch.autograd.gradcheck (float64 finite differences) through the tail bin and the JSD."""
    student_logits, teacher_logits = _student_teacher(seed=12, shape=(2,))
    ids = topk_ids(teacher_logits, K)
    student = log_probs_at(student_logits, ids).detach().requires_grad_(True)
    teacher = log_probs_at(teacher_logits, ids).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, t: topk_divergence(s, t, alpha, tail=True), (student, teacher))


def test_tail_stays_finite_when_top_k_holds_all_the_mass():
    student_logits, teacher_logits = _student_teacher(seed=13)
    ids = topk_ids(teacher_logits, VOCAB)  # K = V: the tail mass is 0 up to rounding
    student = log_probs_at(student_logits, ids)
    value = topk_divergence(student, log_probs_at(teacher_logits, ids), 1.0, tail=True)
    plain = topk_divergence(student, log_probs_at(teacher_logits, ids), 1.0, tail=False)
    (grad,) = torch.autograd.grad(value.sum(), student_logits)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(value, plain, atol=1e-10, rtol=0)  # the near-empty tail adds ~eps


def test_gradient_on_a_student_logit_follows_the_closed_forms_of_the_two_kls():
    """What docs/results.md's reading of the hard level rests on: on a token the teacher favours
    and the student does not, forward KL pushes the student's logit by S - T, reverse KL by
    S (log S - log T - KL(S || T)), a push that vanishes with S (mode-seeking). float64, 1e-12."""
    from megacredit.algorithms.sdpo import divergence_on_bins

    student_logits = random_logits(VOCAB, seed=3).double().requires_grad_(True)
    teacher = torch.log_softmax(random_logits(VOCAB, seed=4).double(), -1)
    student = torch.log_softmax(student_logits, -1)
    s, t = student.exp().detach(), teacher.exp()
    kl = (s * (student.detach() - teacher)).sum()
    for alpha, expected in ((0.0, s - t), (1.0, s * (student.detach() - teacher - kl))):
        (gradient,) = torch.autograd.grad(divergence_on_bins(torch.log_softmax(student_logits, -1), teacher, alpha),
                                          student_logits)
        torch.testing.assert_close(gradient, expected, atol=1e-12, rtol=1e-12)
