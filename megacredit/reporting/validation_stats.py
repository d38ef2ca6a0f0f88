"""Validation statistics: avg@k with a prompt-level bootstrap CI, and unbiased pass@k.

avg@k (CREDIT appendix A): each prompt's score is the mean reward of its k samples; avg@k is
the mean over prompts. The CI "is computed by resampling evaluation prompts with replacement
(2000 resamples). The sampling unit is the prompt" -- a percentile bootstrap over prompts.

pass@k: the unbiased estimator of Chen et al. (2021, arXiv:2107.03374, "Evaluating Large Language Models
Trained on Code", eq. 1): pass@k = 1 - C(n - c, k) / C(n, k) for n samples of which c pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class AvgAtKResult:
    """avg@k of a validation run with its bootstrap confidence interval."""

    mean: float
    """avg@k: mean over prompts of the per-prompt mean reward."""
    ci_low: float
    """Lower end of the percentile bootstrap interval."""
    ci_high: float
    """Upper end of the percentile bootstrap interval."""
    num_prompts: int
    """Prompts evaluated (the bootstrap's sampling unit)."""
    samples_per_prompt: float
    """k (the mean number of samples per prompt if prompts had different counts)."""
    confidence: float
    """Confidence level of the interval."""
    bootstrap_samples: int
    """Number of bootstrap resamples."""

    def to_metrics(self, prefix: str = "val/") -> dict[str, float]:
        """The ``val/avg_at_k*`` metrics of docs/metrics.md."""
        return {
            f"{prefix}avg_at_k": self.mean,
            f"{prefix}avg_at_k_ci_low": self.ci_low,
            f"{prefix}avg_at_k_ci_high": self.ci_high,
            f"{prefix}num_prompts": float(self.num_prompts),
        }


def per_prompt_means(scores: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Mean reward of each prompt; ``scores`` is [prompts, k] or a ragged list of lists."""
    rows = [np.asarray(row, dtype=np.float64).reshape(-1) for row in scores]
    if not rows:
        raise ValueError("validation scores are empty: need at least one prompt")
    for index, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"validation prompt {index} has no samples")
        if not np.all(np.isfinite(row)):
            raise ValueError(f"validation prompt {index} has a non-finite score: {row.tolist()}")
    return np.array([row.mean() for row in rows])


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    num_samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (resampled with replacement)."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    if data.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    if num_samples < 1:
        raise ValueError(f"bootstrap num_samples must be >= 1, got {num_samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    resample_means = np.empty(num_samples, dtype=np.float64)
    chunk = max(1, 2_000_000 // data.size)  # bound the index matrix to ~16 MB
    for start in range(0, num_samples, chunk):
        stop = min(num_samples, start + chunk)
        index = rng.integers(0, data.size, size=(stop - start, data.size))
        resample_means[start:stop] = data[index].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(resample_means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def avg_at_k(
    scores: Sequence[Sequence[float]] | np.ndarray,
    bootstrap_samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> AvgAtKResult:
    """avg@k over prompts x k samples with a prompt-level percentile bootstrap CI."""
    means = per_prompt_means(scores)
    low, high = bootstrap_mean_ci(means, bootstrap_samples, confidence, seed)
    counts = [len(np.asarray(row).reshape(-1)) for row in scores]
    return AvgAtKResult(
        mean=float(means.mean()),
        ci_low=low,
        ci_high=high,
        num_prompts=int(means.size),
        samples_per_prompt=float(np.mean(counts)),
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
    )


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k)/C(n, k) (Chen et al. 2021, eq. 1), computed stably."""
    n, c = int(num_samples), int(num_correct)
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= num_correct <= num_samples, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= num_samples ({n}), got k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(
    scores: Sequence[Sequence[float]] | np.ndarray, k: int, success_threshold: float = 1.0
) -> float:
    """Mean over prompts of unbiased pass@k; a sample passes when reward >= threshold."""
    total = 0.0
    count = 0
    for row in scores:
        values = np.asarray(row, dtype=np.float64).reshape(-1)
        total += pass_at_k(values.size, int((values >= success_threshold).sum()), k)
        count += 1
    if count == 0:
        raise ValueError("mean_pass_at_k: validation scores are empty")
    return total / count
