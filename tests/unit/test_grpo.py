"""GRPO advantages (RLSD eq. 1), clipped surrogate (eq. 2) and loss aggregation (eq. 2/16).

Tolerances: float64 1e-12 for the hand formulas; micro-batch/DP splits must equal the full
batch to 1e-12 (values) and 1e-12 (gradients).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megacredit.algorithms.grpo import group_advantages, ppo_clip_loss
from megacredit.algorithms.losses import aggregate, loss_denominator

TOL = dict(atol=1e-12, rtol=1e-12)


def test_group_advantages_match_hand_formula_with_sample_std():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.2, 0.9, 0.1]
    eps = 1e-6
    ours = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size=4, eps=eps)
    expected = []
    for start in (0, 4):
        group = rewards[start : start + 4]
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev: divide by G - 1
        expected += [(r - mean) / (std + eps) for r in group]
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), **TOL)
    # population std would give a different answer: the test pins the choice
    population = (torch.tensor(rewards[:4]) - 0.5) / (statistics.pstdev(rewards[:4]) + eps)
    assert not torch.allclose(ours[:4].float(), population)


def test_group_advantages_edge_cases():
    constant = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), group_size=2)
    assert (constant == 0).all()  # no NaN for groups with identical rewards
    integer = group_advantages(torch.tensor([1, 0]), group_size=2)
    assert integer.dtype == torch.float32
    centred = group_advantages(torch.tensor([3.0, 1.0]), group_size=2, normalize_by_std=False)
    torch.testing.assert_close(centred, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), group_size=2)


def test_ppo_clip_loss_hand_case():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.7)]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    pg_loss, metrics = ppo_clip_loss(logp, old, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    # token 0: A>0, rho 1.5 > 1.28 -> clipped: -1.28; token 1: A<0, rho 0.5 < 0.8 -> -(-0.8)=0.8
    # token 2: inside the range: -1.1; token 3: masked -> 0
    torch.testing.assert_close(pg_loss, torch.tensor([[-1.28, 0.8, -1.1, 0.0]], dtype=torch.float64), **TOL)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 3)
    expected_k1 = -(math.log(1.5) + math.log(0.5) + math.log(1.1)) / 3
    assert metrics["ppo_kl"].item() == pytest.approx(expected_k1, abs=1e-12)
    expected_k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert metrics["approx_kl"].item() == pytest.approx(expected_k3, abs=1e-12)
    (grad,) = torch.autograd.grad(pg_loss.sum(), logp)
    # clipped tokens carry no gradient; token 2: d(-rho)/dlogp = -rho
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -1.1, 0.0]], dtype=torch.float64), **TOL)


def test_sequence_advantages_broadcast_like_token_advantages():
    logp = torch.randn(3, 5, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(3, 5, dtype=torch.float64)
    seq = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    mask = torch.ones(3, 5)
    from_seq, _ = ppo_clip_loss(logp, old, seq, mask)
    from_tokens, _ = ppo_clip_loss(logp, old, seq[:, None].expand(3, 5), mask)
    torch.testing.assert_close(from_seq, from_tokens, **TOL)
    with pytest.raises(ValueError, match="B="):
        ppo_clip_loss(logp, old, seq[:2], mask)


def _direct_aggregate(per_token, mask, mode):
    """Plain loops: token-mean and RLSD eq. 2's 1/G sum_i 1/|y_i| sum_t (non-empty sequences)."""
    if mode == "token-mean":
        total = count = 0.0
        for i in range(per_token.shape[0]):
            for t in range(per_token.shape[1]):
                if mask[i, t]:
                    total = total + per_token[i, t]
                    count += 1
        return total / count
    sequence_means = []
    for i in range(per_token.shape[0]):
        tokens = [per_token[i, t] for t in range(per_token.shape[1]) if mask[i, t]]
        if tokens:
            sequence_means.append(sum(tokens) / len(tokens))
    return sum(sequence_means) / len(sequence_means)


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    per_token = torch.randn(6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    lengths = [7, 3, 0, 5, 1, 6]  # ragged, with one fully-masked sequence
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    return per_token, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_aggregate_matches_direct_formula(mode):
    per_token, mask = _batch()
    torch.testing.assert_close(aggregate(per_token, mask, mode), _direct_aggregate(per_token, mask, mode), **TOL)
    # masked entries never matter, even NaN
    poisoned = per_token.detach().clone()
    poisoned[mask == 0] = float("nan")
    torch.testing.assert_close(aggregate(poisoned, mask, mode), aggregate(per_token, mask, mode).detach(), **TOL)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_and_dp_splits_with_global_denominator_equal_full_batch(mode):
    per_token, mask = _batch(seed=1)
    full = aggregate(per_token, mask, mode)
    (full_grad,) = torch.autograd.grad(full, per_token)

    # 2 DP ranks x uneven micro-batches: rank 0 holds rows [0, 1] + [2], rank 1 holds [3, 4, 5]
    pieces = [slice(0, 2), slice(2, 3), slice(3, 6)]
    global_denominator = sum(loss_denominator(mask[p], mode) for p in pieces)  # = sum + all-reduce
    shares = [aggregate(per_token[p], mask[p], mode, global_denominator) for p in pieces]
    summed = sum(shares)
    torch.testing.assert_close(summed, full, **TOL)
    (split_grad,) = torch.autograd.grad(summed, per_token)
    torch.testing.assert_close(split_grad, full_grad, **TOL)

    # without the global denominator, per-piece means do NOT reproduce the full batch
    naive = sum(aggregate(per_token[p], mask[p], mode) for p in pieces) / len(pieces)
    assert not torch.allclose(naive, full)


def test_aggregate_rejects_unknown_mode_and_bad_shapes():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "seq-sum")
    with pytest.raises(ValueError, match="per_token"):
        aggregate(torch.zeros(2, 4), torch.ones(2, 3), "token-mean")


def test_algorithms_package_is_megatron_free():
    """The methods must import and run without Megatron-Core (pure torch)."""
    import subprocess
    import sys

    code = (
        "import sys, megacredit.algorithms as a; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformer_engine')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dual_clip_caps_negative_advantage_tokens():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[math.log(5.0), math.log(5.0), math.log(2.0)]], dtype=torch.float64)
    advantages = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    plain, _ = ppo_clip_loss(logp, old, advantages, mask, 0.2, 0.2)
    dual, _ = ppo_clip_loss(logp, old, advantages, mask, 0.2, 0.2, dual_clip_c=3.0)
    # A<0, rho=5: plain max(5, 1.2) = 5, capped at c=3; A>0 untouched (-1.2); rho=2 < c: 2 stays
    torch.testing.assert_close(plain, torch.tensor([[5.0, -1.2, 2.0]], dtype=torch.float64), **TOL)
    torch.testing.assert_close(dual, torch.tensor([[3.0, -1.2, 2.0]], dtype=torch.float64), **TOL)
    with pytest.raises(ValueError, match="dual_clip_c"):
        ppo_clip_loss(logp, old, advantages, mask, dual_clip_c=0.5)
