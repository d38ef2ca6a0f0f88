"""Sequence packing by a token budget: many variable-length sequences in one row, no padding.

A micro-batch is one packed row ``tokens [T]`` holding sequences back to back; ``cu_seqlens``
marks their boundaries so attention stays block-diagonal (each sequence attends only to its own
causal past) and RoPE positions restart at 0 for each sequence. Only the row's tail is padded,
up to ``pad_to_multiple`` (pipeline stages exchange fixed-shape activations); the padding forms
its own block and carries no loss.

For every packed sequence we keep where its *response* predictions sit: the logits at position
``p`` predict token ``p + 1``, so a response occupying packed positions ``[s, e)`` is scored at
positions ``[s - 1, e - 1)`` against targets ``tokens[s:e]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class SequenceToPack:
    """One sequence to place in a micro-batch."""

    key: tuple
    """Caller's identifier, e.g. ("teacher", sample_index) or ("contrastive", sample_index, k)."""
    token_ids: tuple[int, ...]
    """The full sequence: context then response."""
    response_start: int
    """Index in ``token_ids`` of the first response token."""

    @property
    def response_length(self) -> int:
        return len(self.token_ids) - self.response_start


@dataclass
class PackedMicroBatch:
    """A packed row and the bookkeeping to find each sequence's response predictions."""

    tokens: torch.Tensor
    """[T] token ids (T = packed length incl. tail padding)."""
    cu_seqlens: torch.Tensor
    """[n_blocks + 1] int32 cumulative block lengths (the padding tail is its own block)."""
    position_ids: torch.Tensor
    """[T] position of each token within its own sequence."""
    keys: list[tuple] = field(default_factory=list)
    """The ``key`` of each packed sequence, in packing order."""
    prediction_index: torch.Tensor = None  # type: ignore[assignment]
    """[N_resp] packed positions whose outputs predict a response token (all sequences, in order)."""
    target_ids: torch.Tensor = None  # type: ignore[assignment]
    """[N_resp] the response token each of those positions predicts."""
    response_lengths: list[int] = field(default_factory=list)
    """Response length of each packed sequence (splits ``prediction_index`` per sequence)."""

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def _pack_one(items: Sequence[SequenceToPack], pad_to_multiple: int, pad_token_id: int) -> PackedMicroBatch:
    tokens: list[int] = []
    positions: list[int] = []
    cu_seqlens = [0]
    prediction_index: list[int] = []
    target_ids: list[int] = []
    for item in items:
        offset = len(tokens)
        tokens.extend(item.token_ids)
        positions.extend(range(len(item.token_ids)))
        cu_seqlens.append(len(tokens))
        start, end = offset + item.response_start, offset + len(item.token_ids)
        prediction_index.extend(range(start - 1, end - 1))
        target_ids.extend(tokens[start:end])
    padding = (-len(tokens)) % pad_to_multiple
    if padding:
        tokens.extend([pad_token_id] * padding)
        positions.extend(range(padding))
        cu_seqlens.append(len(tokens))
    return PackedMicroBatch(
        tokens=torch.tensor(tokens, dtype=torch.long),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        position_ids=torch.tensor(positions, dtype=torch.long),
        keys=[item.key for item in items],
        prediction_index=torch.tensor(prediction_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        response_lengths=[item.response_length for item in items],
    )


def pack_sequences(
    groups: Sequence[Sequence[SequenceToPack]],
    token_budget: int,
    pad_to_multiple: int = 1,
    pad_token_id: int = 0,
) -> list[PackedMicroBatch]:
    """Pack ``groups`` of sequences into rows of at most ``token_budget`` tokens, in order.

    A group (e.g. one sample's teacher sequence and its C contrastive sequences) is never split
    across micro-batches. Order is preserved (first-fit in sequence), so results can be read back
    by ``keys``. A group longer than the budget gets a row of its own (and a clear error if a
    single sequence alone exceeds it, naming the fix).
    """
    if token_budget < 1 or pad_to_multiple < 1:
        raise ValueError(f"token_budget and pad_to_multiple must be >= 1, got {token_budget}, {pad_to_multiple}")
    rows: list[list[SequenceToPack]] = []
    row_tokens = 0
    for group in groups:
        for item in group:
            if item.response_start < 1 or item.response_length < 1:
                raise ValueError(f"sequence {item.key}: needs >= 1 context and >= 1 response token")
            if len(item.token_ids) > token_budget:
                raise ValueError(
                    f"sequence {item.key} has {len(item.token_ids)} tokens, more than the micro-batch token "
                    f"budget parallel.micro_batch_tokens={token_budget}; raise it or lower rollout.max_seq_len"
                )
        group_tokens = sum(len(item.token_ids) for item in group)
        if not rows or row_tokens + group_tokens > token_budget:
            rows.append([])
            row_tokens = 0
        rows[-1].extend(group)
        row_tokens += group_tokens
    return [_pack_one(row, pad_to_multiple, pad_token_id) for row in rows]


def split_per_sequence(values: torch.Tensor, micro_batch: PackedMicroBatch) -> dict[tuple, torch.Tensor]:
    """Split a [N_resp, ...] tensor of per-prediction values back into {key: [R_i, ...]}."""
    pieces = torch.split(values, micro_batch.response_lengths, dim=0)
    return dict(zip(micro_batch.keys, pieces))
