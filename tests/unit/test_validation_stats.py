"""avg@k with a prompt-level bootstrap CI and unbiased pass@k, against direct computations."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from megacredit.reporting.metrics import DOCUMENTED_METRICS
from megacredit.reporting.validation_stats import (
    avg_at_k,
    bootstrap_mean_ci,
    mean_pass_at_k,
    pass_at_k,
    per_prompt_means,
)


def test_avg_at_k_is_the_mean_of_per_prompt_means_including_ragged():
    scores = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]
    result = avg_at_k(scores, bootstrap_samples=50, seed=1)
    assert result.mean == pytest.approx((0.5 + 0.0 + 0.75) / 3, abs=1e-15)
    assert result.num_prompts == 3 and result.samples_per_prompt == 4
    ragged = [[1.0], [0.0, 1.0, 1.0]]  # per-prompt means 1 and 2/3: not the pooled 3/4
    assert avg_at_k(ragged, bootstrap_samples=10).mean == pytest.approx((1 + 2 / 3) / 2, abs=1e-15)


def test_constant_scores_have_a_degenerate_interval():
    result = avg_at_k(np.full((20, 4), 0.25), bootstrap_samples=200)
    assert (result.ci_low, result.mean, result.ci_high) == (0.25, 0.25, 0.25)


def test_bootstrap_matches_a_plain_loop_with_the_same_draws():
    values = [0.0, 0.25, 1.0, 0.5, 0.75, 1.0, 0.0, 0.5]
    num_samples, confidence, seed = 300, 0.9, 11
    low, high = bootstrap_mean_ci(values, num_samples, confidence, seed)
    # Direct computation: same generator and draw order, then a hand-written percentile
    # (linear interpolation between order statistics, numpy's default definition).
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(num_samples, len(values)))
    means = sorted(sum(values[i] for i in row) / len(values) for row in index.tolist())

    def percentile(q: float) -> float:
        position = q * (len(means) - 1)
        below = math.floor(position)
        above = min(below + 1, len(means) - 1)
        return means[below] + (means[above] - means[below]) * (position - below)

    assert low == pytest.approx(percentile(0.05), abs=1e-12)
    assert high == pytest.approx(percentile(0.95), abs=1e-12)


def test_bootstrap_width_matches_the_normal_approximation():
    # 400 prompts with Bernoulli(0.3) scores: the 95 % interval's half-width should be close
    # to 1.96 * sd / sqrt(n). Tolerance 15 % (bootstrap noise with 4000 resamples is ~3 %).
    rng = random.Random(0)
    values = [1.0 if rng.random() < 0.3 else 0.0 for _ in range(400)]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    low, high = bootstrap_mean_ci(values, num_samples=4000, confidence=0.95, seed=3)
    expected_half_width = 1.96 * sd / math.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(expected_half_width, rel=0.15)
    assert low < mean < high


def test_bootstrap_is_seeded_and_wider_at_higher_confidence():
    values = np.random.default_rng(5).random(50)
    assert bootstrap_mean_ci(values, 500, 0.95, seed=7) == bootstrap_mean_ci(values, 500, 0.95, seed=7)
    assert bootstrap_mean_ci(values, 500, 0.95, seed=7) != bootstrap_mean_ci(values, 500, 0.95, seed=8)
    low80, high80 = bootstrap_mean_ci(values, 2000, 0.80, seed=7)
    low99, high99 = bootstrap_mean_ci(values, 2000, 0.99, seed=7)
    assert low99 < low80 < high80 < high99


@pytest.mark.parametrize("bad, match", [
    ([], "empty"), ([[1.0], []], "prompt 1 has no samples"), ([[float("nan")]], "non-finite"),
])
def test_bad_scores_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        per_prompt_means(bad)


def test_bootstrap_argument_checks():
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci([1.0], confidence=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        bootstrap_mean_ci([1.0], num_samples=0)


def test_pass_at_k_equals_the_combinatorial_formula():
    for n in range(1, 11):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                direct = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(direct, abs=1e-12), (n, c, k)
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0


def test_pass_at_k_argument_checks():
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="1 <= k <= num_samples"):
        pass_at_k(4, 1, 5)


def test_mean_pass_at_k_uses_the_threshold():
    scores = [[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    # prompt 0: one sample >= 1.0 of 3 -> pass@2 = 1 - C(2,2)/C(3,2) = 2/3; prompt 1: 0.
    assert mean_pass_at_k(scores, k=2) == pytest.approx((2 / 3 + 0) / 2)
    # threshold 0.5: two passes of 3 -> pass@2 = 1.
    assert mean_pass_at_k(scores, k=2, success_threshold=0.5) == pytest.approx(0.5)


def test_result_metrics_are_documented_names():
    metrics = avg_at_k([[1, 0], [1, 1]], bootstrap_samples=20).to_metrics()
    assert set(metrics) <= set(DOCUMENTED_METRICS)
    assert metrics["val/avg_at_k"] == 0.75
