"""Independent, deliberately plain reference formulas for the algorithm tests.

Everything here works in PROBABILITY space on a small full vocabulary in float64 (explicit
exp / sum softmax, explicit division for renormalisation, explicit 1 - sum for the tail), so it
shares no code path with megacredit.algorithms, which works in log space on [..., K] inputs.
"""

from __future__ import annotations

import torch

DTYPE = torch.float64


def softmax_probs(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary probabilities by the textbook formula exp(l) / sum exp(l)."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values.detach()
    weights = torch.exp(shifted)
    return weights / weights.sum(dim=-1, keepdim=True)


def topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest logits per row (sorted descending)."""
    return torch.argsort(logits, dim=-1, descending=True)[..., :k]


def restricted_distribution(probs: torch.Tensor, ids: torch.Tensor, tail: bool) -> torch.Tensor:
    """The top-K distribution in probability space: renormalised, or with a tail bin appended."""
    selected = torch.gather(probs, -1, ids)
    total = selected.sum(dim=-1, keepdim=True)
    if tail:
        return torch.cat([selected, 1.0 - total], dim=-1)
    return selected / total


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v p log(p / q) in probability space (all entries positive in these tests)."""
    return (p * torch.log(p / q)).sum(dim=-1)


def divergence(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha = 1 reverse KL(S||T), 0 forward KL(T||S), else (1-a) KL(S||M) + a KL(T||M)."""
    if alpha == 1.0:
        return kl(student, teacher)
    if alpha == 0.0:
        return kl(teacher, student)
    mixture = (1.0 - alpha) * student + alpha * teacher
    return (1.0 - alpha) * kl(student, mixture) + alpha * kl(teacher, mixture)


def tilted_distribution(teacher: torch.Tensor, contrastive: list[torch.Tensor], lam: float) -> torch.Tensor:
    """q(v) ∝ teacher(v) * prod_k contrastive_k(v)^(-lam / C), normalised (probability space)."""
    unnormalised = teacher.clone()
    for distribution in contrastive:
        unnormalised = unnormalised * distribution ** (-lam / len(contrastive))
    return unnormalised / unnormalised.sum(dim=-1, keepdim=True)


def random_logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    """Reproducible float64 logits."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=DTYPE) * scale


def log_probs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Normalised full-vocabulary log-probs at ids: the [..., K] input the algorithms take."""
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, ids)
