"""Shared masking and loss-aggregation helpers for every method (pure torch, no Megatron).

Aggregation modes (RLSD eq. 2 / eq. 16 and the DAPO-style token mean):

* ``token-mean``: ``sum_{i,t} m_{i,t} l_{i,t} / sum_{i,t} m_{i,t}`` -- every valid token of the
  whole mini-batch weighs the same.
* ``seq-mean-token-mean``: ``(1/G') sum_i (1/|y_i|) sum_t m_{i,t} l_{i,t}`` -- RLSD eq. 2/16's
  ``1/G sum_i 1/|y^(i)| sum_t``, where ``|y_i| = sum_t m_{i,t}`` and ``G'`` counts the sequences
  with at least one valid token (a sequence whose mask is all zero, e.g. a sample without a
  teacher signal in SDPO, contributes nothing and is not counted; so does verl's ``agg_loss`` in
  ``verl/trainer/ppo/core_algos.py``).

Global normalisation across micro-batches and data-parallel ranks
----------------------------------------------------------------
A mini-batch is usually split into micro-batches (gradient accumulation) and over DP ranks. The
mean must use the denominator of the WHOLE mini-batch, not of each piece, or short and long
pieces would be weighted wrongly. Recipe:

1. each piece computes ``loss_denominator(mask, mode)`` (its local token or sequence count);
2. the trainer sums these over its micro-batches and all-reduces (SUM) over DP ranks, giving
   ``global_denominator``;
3. each piece calls ``aggregate(per_token, mask, mode, global_denominator)``.

Then ``sum over all pieces of aggregate(...)`` equals ``aggregate`` of the full mini-batch
exactly (up to float summation order; tested). Note the framework convention: the returned
value is this piece's ADDITIVE SHARE of the full-batch loss. If the DP gradient all-reduce
AVERAGES instead of sums (the default of torch DDP and Megatron DDP), the trainer must multiply
the share by the DP world size (``* dp_size`` in verl's ``agg_loss``), and it must not let the
pipeline schedule divide by the number of micro-batches again.
"""

from __future__ import annotations

from typing import Literal

import torch

AggregationMode = Literal["token-mean", "seq-mean-token-mean"]
AGGREGATION_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    """Raise a ValueError naming the field whose shape differs from ``reference``'s."""
    for name, tensor in others.items():
        if tensor is not None and tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but must match {reference_name} "
                f"{tuple(reference.shape)}; pass both per response position"
            )


def check_mask_2d(mask: torch.Tensor, name: str = "mask") -> None:
    """Masks of per-token quantities are [B, T] (batch of responses x response positions)."""
    if mask.dim() != 2:
        raise ValueError(f"{name} must be [B, T] (responses x positions), got {tuple(mask.shape)}")


def as_float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """0/1 (or bool) mask as a float tensor of ``like``'s dtype and device."""
    return mask.to(dtype=like.dtype, device=like.device)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(values * mask)``; masked entries never contribute, even when they hold inf/NaN."""
    float_mask = as_float_mask(mask, values)
    return torch.where(float_mask != 0, values * float_mask, torch.zeros_like(values)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the valid entries of ``mask`` (0 when nothing is valid)."""
    count = as_float_mask(mask, values).sum()
    return masked_sum(values, mask) / count.clamp(min=1.0)


def zero_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` with every masked position set to exactly 0 (NaN/inf there are dropped)."""
    return torch.where(mask.to(torch.bool), values, torch.zeros_like(values))


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"loss aggregation mode {mode!r} is unknown; use one of {AGGREGATION_MODES}")


def loss_denominator(mask: torch.Tensor, mode: AggregationMode) -> torch.Tensor:
    """This piece's share of the global denominator: valid tokens (token-mean) or valid sequences.

    Sum it over micro-batches and all-reduce it over DP ranks to get ``global_denominator``.
    Returned as a float64 0-dim tensor so that large counts stay exact.
    """
    _check_mode(mode)
    check_mask_2d(mask)
    float_mask = mask.to(torch.float64)
    if mode == "token-mean":
        return float_mask.sum()
    return (float_mask.sum(dim=-1) > 0).to(torch.float64).sum()


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: AggregationMode,
    global_denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar (RLSD eq. 2 / eq. 16 reductions).

    Args:
        per_token: per-token loss [B, T] (masked positions may hold anything, even NaN).
        mask: [B, T] 0/1 or bool validity mask (response tokens that carry this loss).
        mode: ``token-mean`` or ``seq-mean-token-mean`` (see the module docstring).
        global_denominator: total valid tokens (token-mean) or total valid sequences
            (seq-mean-token-mean) of the WHOLE mini-batch over micro-batches and DP ranks. None
            means this call sees the whole mini-batch: the local ``loss_denominator`` is used.

    Returns:
        0-dim tensor; with a global denominator, this piece's additive share of the full loss.
    """
    _check_mode(mode)
    check_mask_2d(mask)
    check_same_shape("mask", mask, per_token=per_token)
    if global_denominator is None:
        global_denominator = loss_denominator(mask, mode)
    denominator = torch.as_tensor(global_denominator, dtype=per_token.dtype, device=per_token.device)
    denominator = denominator.clamp(min=1.0)
    float_mask = as_float_mask(mask, per_token)
    masked = zero_masked(per_token, mask) * float_mask
    if mode == "token-mean":
        return masked.sum() / denominator
    tokens_per_sequence = float_mask.sum(dim=-1)
    sequence_means = masked.sum(dim=-1) / tokens_per_sequence.clamp(min=1.0)
    # a fully-masked sequence has sequence_means == 0 exactly, so it adds nothing to the sum
    return sequence_means.sum() / denominator
