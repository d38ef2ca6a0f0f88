"""CREDIT (eq. 8, Algorithm 1): rewards, tilted-teacher loss, the gradient identity, diagnostics.

Tolerances: float64 1e-10 against the plain probability-space references; the gradient identity
to 1e-10 (the brief's bound); lambda = 0 vs SDPO is checked BITWISE (torch.equal).
"""

from __future__ import annotations

import pytest
import torch

from algorithms_reference import (
    divergence,
    log_probs_at,
    random_logits,
    restricted_distribution,
    softmax_probs,
    tilted_distribution,
    topk_ids,
)
from megacredit.algorithms.credit import credit_diagnostics, credit_loss, credit_token_rewards
from megacredit.algorithms.sdpo import sdpo_loss

TOL = dict(atol=1e-10, rtol=1e-10)
VOCAB, K, B, T = 13, 5, 2, 3


def _passes(seed: int, contrastive_count: int):
    """Student (with grad), teacher f and C contrastive g logits [B, T, V] / [C, B, T, V]."""
    student = random_logits(B, T, VOCAB, seed=seed).requires_grad_(True)
    teacher = random_logits(B, T, VOCAB, seed=seed + 1)
    contrastive = random_logits(contrastive_count, B, T, VOCAB, seed=seed + 2)
    return student, teacher, contrastive


def test_credit_token_rewards_is_eq_8():
    student, teacher, contrastive = _passes(seed=1, contrastive_count=3)
    ids = topk_ids(teacher, K)
    f, s = log_probs_at(teacher, ids), log_probs_at(student, ids)
    g = torch.stack([log_probs_at(contrastive[k], ids) for k in range(3)])
    lam = 0.3
    rewards = credit_token_rewards(f, g, s, lam)
    # eq. 8 written out with probabilities: log pi_ref(v|x,z) - lam/C sum_k log pi_ref(v|x'_k,z) - log pi_theta(v|x)
    p_teacher, p_student = softmax_probs(teacher), softmax_probs(student).detach()
    expected = torch.gather(p_teacher, -1, ids).log() - torch.gather(p_student, -1, ids).log()
    for k in range(3):
        expected = expected - lam / 3 * torch.gather(softmax_probs(contrastive[k]), -1, ids).log()
    torch.testing.assert_close(rewards, expected, **TOL)
    assert not rewards.requires_grad  # advantages are stop-gradient
    torch.testing.assert_close(credit_token_rewards(f, g, s, 0.0), (f - s).detach(), **TOL)  # eq. 2


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("tail", [False, True])
def test_credit_loss_is_divergence_to_tilted_teacher(alpha, tail):
    student, teacher, contrastive = _passes(seed=2, contrastive_count=2)
    ids = topk_ids(teacher, K)
    lam = 0.4
    out = credit_loss(
        log_probs_at(student, ids),
        log_probs_at(teacher, ids),
        torch.stack([log_probs_at(c, ids) for c in contrastive]),
        torch.ones(B, T),
        None,
        lam=lam,
        alpha=alpha,
        tail=tail,
    )
    q = tilted_distribution(
        restricted_distribution(softmax_probs(teacher), ids, tail),
        [restricted_distribution(softmax_probs(c), ids, tail) for c in contrastive],
        lam,
    )
    reference = divergence(restricted_distribution(softmax_probs(student), ids, tail), q, alpha)
    torch.testing.assert_close(out.per_token_loss, reference, **TOL)
    (grad_ours,) = torch.autograd.grad(out.per_token_loss.sum(), student)
    (grad_reference,) = torch.autograd.grad(reference.sum(), student)
    torch.testing.assert_close(grad_ours, grad_reference, **TOL)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [False, True])
def test_lambda_zero_reproduces_sdpo_bitwise(alpha, tail):
    student, teacher, contrastive = _passes(seed=3, contrastive_count=2)
    student32 = student.detach().float().requires_grad_(True)  # also in float32, where rounding would show
    ids = topk_ids(teacher, K)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    signal = torch.tensor([True, True])
    f = log_probs_at(teacher, ids).float()
    g = torch.stack([log_probs_at(c, ids) for c in contrastive]).float()
    s = log_probs_at(student32, ids)
    ours = credit_loss(s, f, g, mask, signal, lam=0.0, alpha=alpha, tail=tail)
    sdpo = sdpo_loss(s, f, mask, signal, alpha=alpha, tail=tail)
    assert torch.equal(ours.per_token_loss, sdpo.per_token_loss)
    (grad_ours,) = torch.autograd.grad(ours.per_token_loss.sum(), student32, retain_graph=True)
    (grad_sdpo,) = torch.autograd.grad(sdpo.per_token_loss.sum(), student32)
    assert torch.equal(grad_ours, grad_sdpo)
    # and a nonzero lambda does change the loss (so the check above is not vacuous)
    assert not torch.allclose(credit_loss(s, f, g, mask, signal, lam=0.1, alpha=alpha, tail=tail).per_token_loss, sdpo.per_token_loss)


def test_c_contrastive_passes_are_averaged_in_log_space():
    student, teacher, contrastive = _passes(seed=4, contrastive_count=3)
    ids = topk_ids(teacher, K)
    s, f = log_probs_at(student, ids), log_probs_at(teacher, ids)
    g = torch.stack([log_probs_at(c, ids) for c in contrastive])
    mask = torch.ones(B, T)
    three = credit_loss(s, f, g, mask, None, lam=0.2)
    # renormalised mode: per-pass normalisers are constant in v, so C passes act like one pass
    # whose log-probs are the mean of the C passes' log-probs (eq. 8's (1/C) sum_k g_k)
    one = credit_loss(s, f, g.mean(dim=0, keepdim=True), mask, None, lam=0.2)
    torch.testing.assert_close(three.per_token_loss, one.per_token_loss, **TOL)
    permuted = credit_loss(s, f, g[[2, 0, 1]], mask, None, lam=0.2)
    torch.testing.assert_close(three.per_token_loss, permuted.per_token_loss, **TOL)
    single = credit_loss(s, f, g[:1], mask, None, lam=0.2)
    assert not torch.allclose(three.per_token_loss, single.per_token_loss)


def _expected_policy_gradient(student_logits, ids, rewards):
    """-sum_{v in K} s(v) (R(v) - Rbar) grad_logits log pi(v), grad_logits log pi(v) = e_v - pi."""
    probs = softmax_probs(student_logits).detach()
    selected = torch.gather(probs, -1, ids)
    renormalised = selected / selected.sum(-1, keepdim=True)
    baseline = (renormalised * rewards).sum(-1, keepdim=True)
    gradient = torch.zeros_like(probs)
    for k in range(ids.shape[-1]):
        one_hot = torch.nn.functional.one_hot(ids[..., k], probs.shape[-1]).to(probs.dtype)
        coefficient = (renormalised[..., k] * (rewards[..., k] - baseline[..., 0])).unsqueeze(-1)
        gradient = gradient - coefficient * (one_hot - probs)
    return gradient


@pytest.mark.parametrize("top_k", [K, VOCAB])
def test_reverse_kl_gradient_equals_policy_gradient_with_credit_rewards(top_k):
    """The identity behind CREDIT eq. 8: grad KL(s || q) = -sum_v s(v) (R_t(v) - Rbar_t) grad log pi(v)."""
    student, teacher, contrastive = _passes(seed=5, contrastive_count=2)
    ids = topk_ids(teacher, top_k)
    s, f = log_probs_at(student, ids), log_probs_at(teacher, ids)
    g = torch.stack([log_probs_at(c, ids) for c in contrastive])
    lam = 0.1
    out = credit_loss(s, f, g, torch.ones(B, T), None, lam=lam, alpha=1.0, tail=False)
    (grad_kl,) = torch.autograd.grad(out.per_token_loss.sum(), student)
    rewards = credit_token_rewards(f, g, s, lam)
    expected = _expected_policy_gradient(student, ids, rewards)
    torch.testing.assert_close(grad_kl, expected, atol=1e-10, rtol=0)
    if top_k == VOCAB:  # full vocabulary: the baseline term vanishes, -sum_v pi R grad log pi
        probs = softmax_probs(student).detach()
        full_rewards = torch.zeros_like(probs).scatter(-1, ids, rewards)
        no_baseline = -(probs * full_rewards) + probs * (probs * full_rewards).sum(-1, keepdim=True)
        torch.testing.assert_close(grad_kl, no_baseline, atol=1e-10, rtol=0)


def test_credit_diagnostics_hand_values():
    teacher = torch.tensor([[-1.0, -2.0, -0.5]])
    contrastive = torch.tensor([[[-1.5, -1.0, -0.5]], [[-2.5, -2.0, -9.0]]])  # C = 2
    student = torch.tensor([[-1.2, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 0]])
    diag = credit_diagnostics(teacher, contrastive, student, mask)
    torch.testing.assert_close(diag.input_specific_signal, torch.tensor([[1.0, -0.5, 0.0]]))  # f - mean g
    torch.testing.assert_close(diag.realized_delta_v, torch.tensor([[0.2, -1.0, 0.0]]))  # f - student
    torch.testing.assert_close(diag.input_specific_signal_sum, torch.tensor([0.5]))
    torch.testing.assert_close(diag.realized_delta_v_sum, torch.tensor([-0.8]))
    torch.testing.assert_close(diag.contrastive_std, torch.tensor([[0.5, 0.5, 0.0]]))  # |a - b| / 2
    assert diag.metrics["input_specific_signal_mean"].item() == pytest.approx(0.25)
    single = credit_diagnostics(teacher, contrastive[:1], student, mask)
    assert (single.contrastive_std == 0).all()


def test_bad_contrastive_shape_and_lambda_raise():
    x = torch.randn(B, T, K).log_softmax(-1)
    with pytest.raises(ValueError, match="contrastive_logp"):
        credit_token_rewards(x, x, x, 0.1)
    with pytest.raises(ValueError, match="lambda"):
        credit_token_rewards(x, x[None], x, -0.1)
    with pytest.raises(ValueError, match="contrastive_topk_logp"):
        credit_loss(x, x, x[None, :1], torch.ones(B, T), None)
