"""RLSD token advantages (eq. 13-14, Algorithm 1 line 17), the hybrid, schedules, leakage.

Tolerances: hand-computed float64 cases to 1e-12; property tests check signs exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megacredit.algorithms.credit_rlsd import credit_rlsd_metrics, credit_rlsd_token_advantages
from megacredit.algorithms.diagnostics import count_privileged_leakage, leakage_report
from megacredit.algorithms.grpo import group_advantages
from megacredit.algorithms.rlsd import rlsd_metrics, rlsd_token_advantages
from megacredit.algorithms.schedules import LambdaSchedule

TOL = dict(atol=1e-12, rtol=1e-12)


def _hand_case():
    seq_adv = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
    # Delta_t per token: row 0 [0.1, 1.0, -2.0, pad], row 1 [0.1, 1.0, -2.0, 0.05], row 2 [3.0, ...]
    student = torch.full((3, 4), -1.0, dtype=torch.float64)
    teacher = student + torch.tensor([[0.1, 1.0, -2.0, 7.0], [0.1, 1.0, -2.0, 0.05], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    return seq_adv, teacher, student, mask


def _line_17(a, delta, eps_w, lam):
    """A * ((1 - lam) + lam * clip(exp(sign(A) * Delta), 1 - eps, 1 + eps)), written plainly."""
    sign = (a > 0) - (a < 0)
    w = math.exp(sign * delta)
    return a * ((1 - lam) + lam * min(max(w, 1 - eps_w), 1 + eps_w))


def test_rlsd_token_advantages_hand_case_and_clip_fraction():
    seq_adv, teacher, student, mask = _hand_case()
    eps_w, lam = 0.2, 0.5
    ours = rlsd_token_advantages(seq_adv, teacher, student, mask, eps_w, lam)
    delta = (teacher - student).tolist()
    expected = [
        [_line_17(seq_adv[i].item(), delta[i][t], eps_w, lam) if mask[i, t] else 0.0 for t in range(4)]
        for i in range(3)
    ]
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), **TOL)
    # weights: row 0 (A>0) exp(0.1)=1.105 in, exp(1)=2.7 clipped, exp(-2)=0.135 clipped;
    # row 1 (A<0) exp(-0.1)=0.905 in, exp(-1) clipped, exp(2) clipped, exp(-0.05) in;
    # row 2 (A=0) w = 1 everywhere, not clipped. 4 clipped of 11 valid tokens.
    metrics = rlsd_metrics(seq_adv, teacher, student, mask, eps_w)
    assert metrics["clip_fraction"].item() == pytest.approx(4 / 11)


def test_lambda_zero_is_plain_grpo_broadcast():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    seq_adv = group_advantages(rewards, group_size=3)
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    student = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    mask = torch.ones(6, 5)
    mask[2, 3:] = 0
    ours = rlsd_token_advantages(seq_adv, teacher, student, mask, eps_w=0.2, lam=0.0)
    assert torch.equal(ours, seq_adv[:, None].expand(6, 5) * mask.double())


def test_masked_positions_are_zero_even_with_non_finite_padding():
    seq_adv, teacher, student, mask = _hand_case()
    teacher[0, 3] = float("nan")
    student[1, 0] = float("-inf")
    mask[1, 0] = 0
    ours = rlsd_token_advantages(seq_adv, teacher, student, mask, 0.2, 0.5)
    assert torch.isfinite(ours).all()
    assert ours[0, 3] == 0 and ours[1, 0] == 0


finite_logp = st.floats(min_value=-60.0, max_value=0.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    length=st.integers(1, 6),
    eps_w=st.floats(0.0, 0.99),
    lam=st.floats(0.0, 1.0),
)
def test_sign_of_every_token_advantage_equals_sign_of_a(data, batch, length, eps_w, lam):
    # |A| >= 1e-6 or exactly 0: a subnormal A could round A * weight to 0 (not a property of RLSD)
    advantage = st.one_of(st.just(0.0), st.floats(1e-6, 5.0), st.floats(-5.0, -1e-6))
    seq_adv = torch.tensor(data.draw(st.lists(advantage, min_size=batch, max_size=batch)), dtype=torch.float64)
    matrix = st.lists(st.lists(finite_logp, min_size=length, max_size=length), min_size=batch, max_size=batch)
    teacher = torch.tensor(data.draw(matrix), dtype=torch.float64)
    student = torch.tensor(data.draw(matrix), dtype=torch.float64)
    contrastive = torch.tensor(data.draw(matrix), dtype=torch.float64)[None]
    mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=batch, max_size=batch)))
    expected_sign = torch.sign(seq_adv)[:, None].expand(batch, length) * mask
    for advantages in (
        rlsd_token_advantages(seq_adv, teacher, student, mask, eps_w, lam),
        credit_rlsd_token_advantages(seq_adv, teacher, contrastive, mask, eps_w, lam),
    ):
        assert torch.equal(torch.sign(advantages), expected_sign)
        # magnitude bounded by the clip: |A| (1 - lam eps_w) <= |A_hat| <= |A| (1 + lam eps_w)
        bound = seq_adv.abs()[:, None] * lam * eps_w + 1e-12
        assert ((advantages.abs() - seq_adv.abs()[:, None] * mask).abs() <= bound).all()


def test_invalid_hyperparameters_raise():
    seq_adv, teacher, student, mask = _hand_case()
    with pytest.raises(ValueError, match="eps_w"):
        rlsd_token_advantages(seq_adv, teacher, student, mask, eps_w=1.0, lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        rlsd_token_advantages(seq_adv, teacher, student, mask, eps_w=0.2, lam=1.5)
    with pytest.raises(ValueError, match="seq_adv"):
        rlsd_token_advantages(seq_adv[:2], teacher, student, mask, 0.2, 0.5)


def test_hybrid_uses_contrastive_evidence_s_t():
    seq_adv, teacher, _, mask = _hand_case()
    contrastive = torch.stack([teacher - 0.3, teacher - 1.7])  # S_t = 0.3 / 1.7 mean = 1.0 everywhere
    ours = credit_rlsd_token_advantages(seq_adv, teacher, contrastive, mask, 0.2, 0.5)
    expected = torch.tensor(
        [[_line_17(seq_adv[i].item(), 1.0, 0.2, 0.5) if mask[i, t] else 0.0 for t in range(4)] for i in range(3)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ours, expected, **TOL)
    # with the student as the single "contrastive" pass the hybrid IS RLSD
    student = teacher - 0.7
    torch.testing.assert_close(
        credit_rlsd_token_advantages(seq_adv, teacher, student[None], mask, 0.2, 0.5),
        rlsd_token_advantages(seq_adv, teacher, student, mask, 0.2, 0.5),
        **TOL,
    )
    # S_t = 1.0 gives w = e (A>0) or 1/e (A<0): both clipped (3 + 4 tokens); the A = 0 row is never clipped
    assert credit_rlsd_metrics(seq_adv, teacher, contrastive, mask, 0.2)["clip_fraction"].item() == pytest.approx(7 / 11)


def test_lambda_schedules():
    paper = LambdaSchedule.rlsd_paper_default()
    assert [paper.value(s) for s in (0, 10, 25, 50, 80)] == pytest.approx([0.5, 0.4, 0.25, 0.0, 0.0])
    assert paper(25) == pytest.approx(0.25)
    assert LambdaSchedule.constant(0.3).value(1000) == 0.3
    assert LambdaSchedule.linear(0.0, 1.0, 4).value(1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="steps"):
        LambdaSchedule.linear(0.5, 0.0, 0)
    with pytest.raises(ValueError, match="kind"):
        LambdaSchedule(kind="cosine")


def test_privileged_leakage_counter():
    responses = [
        "Given that the Reference   Solution uses 9 values, I will assume ...",  # case + spaces
        "But wait, the reference solution says \"No\", and according to the hint ...",
        "The mean is 4, so the answer is \\boxed{4}.",
        "I solve it step by step without any help.",
    ]
    assert count_privileged_leakage(responses) == 2
    report = leakage_report(responses)
    assert report.per_phrase["reference solution"] == 2 and report.per_phrase["according to the hint"] == 1
    assert report.rate == pytest.approx(0.5)
    assert count_privileged_leakage(responses, phrases=("step by step",)) == 1
    assert count_privileged_leakage([]) == 0
    with pytest.raises(TypeError, match="phrases"):
        count_privileged_leakage(responses, phrases="reference")
