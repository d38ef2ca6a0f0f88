"""Pure-torch pieces of the embedded sampling loop: left padding, positions, token choice.

Kept apart from the engine so each piece is small and testable on its own.
"""

from __future__ import annotations

import torch

from megacredit.rollout.base import SamplingParams


def left_pad(
    prompts: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into ``input_ids`` [B, L] and ``attention_mask`` [B, L] (1 = real)."""
    max_len = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), max_len), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, max_len - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, max_len - len(prompt):] = 1
    return input_ids, attention_mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token.

    Pad positions get 1 (transformers 5.x's ``GenerationMixin._prepare_position_ids_for_generation``
    in transformers/generation/utils.py uses 0); any value works, pads are masked out.
    """
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


def _mask_top_k(scaled_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k logits per row (ties at the k-th value are kept), others -> -inf."""
    top_k = min(top_k, scaled_logits.shape[-1])
    kth_value = torch.topk(scaled_logits, top_k, dim=-1).values[..., -1:]
    return scaled_logits.masked_fill(scaled_logits < kth_value, float("-inf"))


def _mask_top_p(scaled_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest prefix of the sorted distribution with mass >= top_p.

    A token is dropped when the mass of the tokens strictly more likely than it already
    reaches top_p; the most likely token is always kept.
    """
    sorted_logits, sorted_index = torch.sort(scaled_logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_index, drop_sorted)
    return scaled_logits.masked_fill(drop, float("-inf"))


def sampling_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The logits of the distribution actually sampled: temperature, then top-k, then top-p.

    Only meaningful for ``temperature > 0`` (greedy takes the argmax of the raw logits).
    """
    scaled = logits.float() / params.temperature
    if params.top_k > 0:
        scaled = _mask_top_k(scaled, params.top_k)
    if params.top_p < 1.0:
        scaled = _mask_top_p(scaled, params.top_p)
    return scaled


def choose_next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick one token per row from last-position ``logits`` [B, V]; returns [B] int64."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(sampling_logits(logits, params), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) over the full vocabulary at ``tokens``: [B].

    The tempered distribution that was sampled, before top-k / top-p truncation: what the
    trainer scores (every pass at the rollout temperature)."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
