"""Log-prob of the sampled token from vocab-parallel logits (GRPO / RLSD / PPO ratios).

Two paths, same result (up to the fused kernel's float32 rounding):

* ours (always on CPU, and whenever the flag is off): :func:`vocab_parallel_logprobs_at`
  -- masked local gather + all-reduce, minus the global logsumexp, differentiable;
* Transformer Engine (``use_te_fused_cross_entropy=True`` AND TE importable AND the logits are
  on CUDA): TE's fused Triton vocab-parallel cross entropy,
  ``transformer_engine.pytorch.cross_entropy.parallel_cross_entropy(inp, target,
  label_smoothing, reduce_loss, dist_process_group, ignore_idx)`` (``CrossEntropyFunction.apply``
  itself up to TE 2.9, a function with the same positional order from 2.10; called
  positionally; ``inp`` is (B, SQ, V/TP), ``target`` (B, SQ)
  global ids, returns the per-token loss = -log p(target) in float32 when
  ``reduce_loss=False``). TE assumes equal shards with rank r holding
  [r * V_local, (r + 1) * V_local); other layouts fall back to ours.

  THE TE PATH IS UNVERIFIED HERE: this machine has no GPU and the PyPI
  ``transformer-engine`` package cannot be imported on CPU. Its call signature was taken from
  TE's source (``transformer_engine/pytorch/cross_entropy.py``), not executed. Padded
  vocabulary columns (ids >= ``vocab_size``) are filled with the dtype's most negative finite
  value before the call (a finite value keeps any online-softmax rescaling NaN-free); Megatron's
  own cross entropy does not mask them at all.

Importing this module never imports TE; the import is attempted lazily, once, at the first
call with the flag on, and any failure (ImportError, or the RuntimeError the CPU meta package
raises) just selects the fallback, with one ``RuntimeWarning`` per distinct reason.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from megacredit.algorithms.topk import (
    check_logits_shard,
    check_token_ids,
    effective_vocab_size,
    vocab_parallel_logprobs_at,
)

_warned_reasons: set[str] = set()


@functools.lru_cache(maxsize=1)
def load_te_parallel_cross_entropy() -> Callable | None:
    """TE's ``parallel_cross_entropy`` or None if Transformer Engine cannot be imported here."""
    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError from TE's CPU meta package
        return None
    return parallel_cross_entropy


def _warn_once(reason: str) -> None:
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(
            f"use_te_fused_cross_entropy=True ignored: {reason}; using megacredit's "
            "vocab_parallel_logprobs_at instead",
            RuntimeWarning,
            stacklevel=3,
        )


def _te_fallback_reason(logits_shard: torch.Tensor, vocab_start: int, group) -> str | None:
    """Why the TE path cannot be used for this call, or None if it can."""
    if not logits_shard.is_cuda:
        return "the logits are not on a CUDA device"
    if load_te_parallel_cross_entropy() is None:
        return "transformer_engine.pytorch.cross_entropy cannot be imported"
    rank = 0 if group is None else dist.get_rank(group)
    if vocab_start != rank * logits_shard.shape[-1]:
        return f"TE needs rank r to hold ids from r * V_local, but vocab_start={vocab_start}"
    return None


def _te_sampled_logprobs(
    flat_logits: torch.Tensor, flat_ids: torch.Tensor, group, vocab_start: int, vocab_size
) -> torch.Tensor:
    """UNVERIFIED GPU path: -TE fused cross entropy, see the module docstring."""
    local_vocab = flat_logits.shape[-1]
    if vocab_size is not None and vocab_start + local_vocab > vocab_size:
        column = torch.arange(local_vocab, device=flat_logits.device)
        is_padding = column >= max(0, vocab_size - vocab_start)
        flat_logits = flat_logits.masked_fill(is_padding, torch.finfo(flat_logits.dtype).min)
    parallel_cross_entropy = load_te_parallel_cross_entropy()
    loss = parallel_cross_entropy(
        flat_logits.unsqueeze(0), flat_ids.unsqueeze(0), 0.0, False, group, -100
    )
    return -loss.reshape(flat_ids.shape)


def sampled_token_logprobs(
    logits_shard: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    use_te_fused_cross_entropy: bool = False,
) -> torch.Tensor:
    """log p(token_ids) under softmax of vocab-parallel logits, differentiable.

    ``logits_shard`` [..., V_local] (this rank's vocabulary columns, see
    :mod:`megacredit.algorithms.topk` for the layout), ``token_ids`` [...] global ids of the
    sampled tokens. Returns [...] in float32 (float64 for float64 logits). With
    ``use_te_fused_cross_entropy=True`` the fused Transformer Engine kernel is used when
    possible (GPU only, unverified here), else ours, with a one-time warning.
    """
    if not isinstance(logits_shard, torch.Tensor) or logits_shard.dim() < 1:
        raise ValueError("logits_shard must be a tensor [..., V_local]")
    if not isinstance(token_ids, torch.Tensor) or token_ids.shape != logits_shard.shape[:-1]:
        raise ValueError(
            f"token_ids must have the shape of logits_shard without its last dim "
            f"({tuple(logits_shard.shape[:-1])}), got {getattr(token_ids, 'shape', None)}"
        )
    flat_logits = logits_shard.reshape(-1, logits_shard.shape[-1])
    flat_ids = token_ids.reshape(-1)
    check_logits_shard(flat_logits, vocab_start, vocab_size, group)
    if use_te_fused_cross_entropy:
        reason = _te_fallback_reason(flat_logits, vocab_start, group)
        if reason is None:
            vocab = effective_vocab_size(flat_logits.shape[1], group, vocab_size)
            check_token_ids(flat_ids, flat_ids.shape[0], vocab, "token_ids")
            logprobs = _te_sampled_logprobs(flat_logits, flat_ids, group, vocab_start, vocab_size)
            return logprobs.reshape(token_ids.shape)
        _warn_once(reason)
    logprobs = vocab_parallel_logprobs_at(flat_logits, flat_ids, group, vocab_start, vocab_size)
    return logprobs.reshape(token_ids.shape)
