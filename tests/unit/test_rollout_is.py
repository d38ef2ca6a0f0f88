"""Truncated rollout importance sampling and the mismatch diagnostics vs direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

from megacredit.algorithms.rollout_is import mismatch_sums, rollout_is_weights


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 5, generator=generator, dtype=torch.float64) * 3
    engine = old + torch.randn(3, 5, generator=generator, dtype=torch.float64) * 0.7
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    engine[~mask] = -math.inf  # padding of the engine's log-probs may hold anything
    return old, engine, mask


@pytest.mark.parametrize("cap", [0.5, 1.5, 100.0])
def test_token_weights_equal_the_direct_formula(cap):
    old, engine, mask = _batch()
    weights = rollout_is_weights(old, engine, mask, "token", cap)
    for b in range(3):
        for t in range(5):
            expected = min(math.exp(old[b, t] - engine[b, t]), cap) if mask[b, t] else 0.0
            assert weights[b, t].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("cap", [0.5, 2.0, 1e6])
def test_sequence_weights_equal_the_direct_formula(cap):
    old, engine, mask = _batch(1)
    weights = rollout_is_weights(old, engine, mask, "sequence", cap)
    for b in range(3):
        log_ratio = sum(float(old[b, t] - engine[b, t]) for t in range(5) if mask[b, t])
        expected = min(math.exp(max(min(log_ratio, 20.0), -20.0)), cap)
        for t in range(5):
            assert weights[b, t].item() == pytest.approx(expected if mask[b, t] else 0.0, rel=1e-12)


def test_weights_are_detached_and_none_is_the_mask():
    old, engine, mask = _batch()
    old.requires_grad_(True)
    assert not rollout_is_weights(old, engine, mask, "token", 2.0).requires_grad
    torch.testing.assert_close(rollout_is_weights(old, engine, mask, "none", 2.0), mask.double())
    # Equal policies: every valid weight is exactly 1.
    same = rollout_is_weights(old.detach(), old.detach(), mask, "sequence", 2.0)
    torch.testing.assert_close(same, mask.double())


def test_bad_arguments_are_named():
    old, engine, mask = _batch()
    with pytest.raises(ValueError, match="unknown"):
        rollout_is_weights(old, engine, mask, "geometric", 2.0)
    with pytest.raises(ValueError, match="cap must be > 0"):
        rollout_is_weights(old, engine, mask, "token", 0.0)
    with pytest.raises(ValueError, match="engine_logp"):
        rollout_is_weights(old, engine[:, :4], mask, "token", 2.0)


def test_mismatch_sums_equal_the_direct_formulas():
    old, engine, mask = _batch(2)
    sums = mismatch_sums(old, engine, mask)
    pairs = [(float(old[b, t]), float(engine[b, t])) for b in range(3) for t in range(5) if mask[b, t]]
    assert sums["logprob_abs_diff"] == pytest.approx((sum(abs(o - e) for o, e in pairs), len(pairs)))
    assert sums["kl_k1"] == pytest.approx((sum(e - o for o, e in pairs), len(pairs)))
    k3 = sum(math.exp(o - e) - 1 - (o - e) for o, e in pairs)
    assert sums["kl_k3"] == pytest.approx((k3, len(pairs)))
    assert sums["kl_k3"][0] >= 0


def test_the_weights_multiply_each_tokens_loss_before_aggregation():
    from megacredit.algorithms import grpo
    from megacredit.algorithms.methods import micro_batch_loss
    from megacredit.algorithms.objective import MicroBatchInputs, ObjectiveSettings

    old, engine, mask = _batch(3)
    logp = (old + 0.05).float().requires_grad_(True)
    advantages = torch.tensor([[1.0] * 5, [-0.5] * 5, [2.0] * 5])
    weights = rollout_is_weights(old, engine, mask, "token", 2.0).float()
    settings = ObjectiveSettings(method="grpo")
    inputs = MicroBatchInputs(mask=mask, logp=logp, old_logp=old.float(), token_advantages=advantages,
                              token_weights=weights)
    terms = micro_batch_loss(settings, inputs)
    per_token, _ = grpo.ppo_clip_loss(logp, old.float(), advantages, mask, 0.2, 0.2)
    expected = (per_token * weights)[mask].sum()  # token-mean numerator
    torch.testing.assert_close(terms.numerator, expected)
    plain = micro_batch_loss(settings, MicroBatchInputs(mask=mask, logp=logp, old_logp=old.float(),
                                                        token_advantages=advantages))
    assert not torch.allclose(plain.numerator, terms.numerator)
