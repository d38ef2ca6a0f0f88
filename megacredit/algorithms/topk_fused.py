"""Chunked, memory-bounded top-K / log-prob extraction with a recomputing backward.

The trainer calls one of the two wrappers once per forward pass and gets, in ONE pass over
the vocabulary shard,

* this pass's own top-K (``k``): ids and normalised log-probs, e.g. the teacher's top-K on the
  response positions;
* log-probs at ids chosen elsewhere (``gather_ids`` [..., Kg]), e.g. the student's log-probs at
  the teacher's top-K ids, with gradient;
* the log-prob of the sampled token (``sampled_ids`` [...]), with gradient (GRPO/RLSD ratios);
* the global logsumexp (the log-softmax normaliser).

Entry points (see their docstrings):

* :func:`chunked_topk_logprobs_from_hidden` ``(hidden [..., H], weight_shard [V_local, H])``:
  the LM head (Megatron's ``ColumnParallelLinear`` output layer weight, or a tied embedding
  shard) is applied chunk by chunk, so the logits never exist for more than ``chunk_size``
  tokens at a time, neither in forward nor in backward.
* :func:`chunked_topk_logprobs_from_logits` ``(logits_shard [..., V_local])``: for callers that
  already hold the logits; saves only a reference to them (no fp32 copy) and recomputes the
  softmax chunk-wise in backward.

Saved for backward (besides references to the inputs): top-K ids [N, k], gather ids
[N, Kg(+1)] and the logsumexp [N] -- O(N * K), never O(N * V_local) unless the caller lets
the hidden path keep the logits (``keep_logits_max_bytes``). Peak temporary memory is
a few [chunk_size, V_local] compute-dtype tensors. ``tests/unit/test_topk_fused.py`` checks
the saved bytes with ``torch.autograd.graph.saved_tensors_hooks``;
``benchmarks/topk_loss.py`` measures the peak RSS against a naive full-vocabulary path.

Backward (per chunk, z = the chunk's masked logits, p = softmax(z) over the full vocabulary,
rebuilt from the saved global logsumexp as p = exp(z - lse) -- no communication):
    d logp(i)/dz = onehot(i) - p,   d lse/dz = p,   so
    grad_z = sum_i onehot(i) * g_i  -  p * (sum_i g_i - g_lse)
where the one-hots are scattered only for ids inside this rank's shard.

Reductions over ``group`` (TP > 1; none at all when ``group`` is None):

* forward, per chunk: all-reduce MAX [c] and SUM [c] (logsumexp); all-gather [c, k] values and
  [c, k] ids (top-K candidates); all-reduce SUM [c, Kg(+1)] (masked local gathers).
* backward: grad_weight_shard = grad_z^T @ hidden is local (this rank's rows only, no
  reduction). grad_hidden = grad_z @ weight_shard is a partial sum over the vocabulary
  shards, so it is all-reduced (SUM over ``group``, once, on the whole [N, H], in the compute
  dtype) when ``all_reduce_grad_hidden=True`` -- exactly the reduction Megatron's
  ``ColumnParallelLinear`` does in backward (``copy_to_tensor_model_parallel_region``) when
  sequence parallelism is off. With sequence parallelism on, the caller gathers ``hidden``
  with Megatron's ``gather_from_sequence_parallel_region`` (whose backward reduce-scatters)
  and must pass ``all_reduce_grad_hidden=False`` to avoid summing twice.
* the logits path needs no backward reduction: each rank's grad_logits is its own shard.

All ranks of ``group`` must call with the same N and ``chunk_size`` (the collectives of every
chunk must line up). Precision: bfloat16/float16 inputs use the input dtype for the matmuls
(as Megatron's output layer does; the logits are rounded to that dtype), everything after
(logsumexp, softmax, top-K, grads w.r.t. logits, the grad_weight accumulator, the grad_hidden
all-reduce) is float32; float64 inputs stay float64 throughout. To apply a sampling
temperature, divide ``hidden`` (or the logits) by it before the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from megacredit.algorithms.topk import (
    check_k,
    check_logits_shard,
    check_token_ids,
    check_vocab_layout,
    compute_dtype_for,
    effective_vocab_size,
    gather_logits_of_masked,
    logsumexp_of_masked,
    mask_padded_columns,
    masked_compute_logits,
    topk_of_masked,
)


@dataclass
class TopKLogprobs:
    """Result of one chunked pass; leading dims ``...`` are those of the input tokens."""

    topk_ids: torch.Tensor | None
    """[..., k] int64 global ids of this pass's top-k tokens, by descending log-prob (None if k is None)."""
    topk_logprobs: torch.Tensor | None
    """[..., k] full-vocabulary log-probs at ``topk_ids``; differentiable (None if k is None)."""
    logsumexp: torch.Tensor
    """[...] global log sum_v exp(logit_v) over the real vocabulary; differentiable."""
    gathered_logprobs: torch.Tensor | None
    """[..., Kg] log-probs at ``gather_ids``; differentiable (None if gather_ids is None)."""
    sampled_logprobs: torch.Tensor | None
    """[...] log-probs at ``sampled_ids``; differentiable (None if sampled_ids is None)."""


@dataclass(frozen=True)
class ChunkPlan:
    """Static arguments of a chunked pass (identical on every rank of ``group``)."""

    k: int
    """Top-k size of this pass; 0 = no top-k."""
    chunk_size: int
    """Tokens per chunk: bounds the [chunk_size, V_local] temporaries."""
    group: dist.ProcessGroup | None
    """Vocab-parallel (TP) group; None = single process, no communication."""
    vocab_start: int
    """Global id of this shard's column 0."""
    vocab_size: int | None
    """Real (unpadded) global vocabulary size; ids >= it are masked to -inf."""


# ----------------------------------------------------------------------------- per-chunk math


def _forward_chunk(z: torch.Tensor, gather_ids: torch.Tensor, plan: ChunkPlan):
    """(logsumexp [c], topk ids [c, k], topk logprobs [c, k], gathered logprobs [c, Kg])."""
    logsumexp = logsumexp_of_masked(z, plan.group)
    if plan.k:
        values, topk_ids = topk_of_masked(z, plan.k, plan.group, plan.vocab_start)
        topk_logprobs = values - logsumexp.unsqueeze(-1)
    else:
        topk_ids = torch.empty((z.shape[0], 0), dtype=torch.long, device=z.device)
        topk_logprobs = z.new_empty((z.shape[0], 0))
    if gather_ids.shape[-1]:
        gathered = gather_logits_of_masked(z, gather_ids, plan.group, plan.vocab_start)
        gathered_logprobs = gathered - logsumexp.unsqueeze(-1)
    else:
        gathered_logprobs = z.new_empty((z.shape[0], 0))
    return logsumexp, topk_ids, topk_logprobs, gathered_logprobs


def _scatter_add_local_(
    grad_z: torch.Tensor, global_ids: torch.Tensor, grads: torch.Tensor, vocab_start: int
) -> None:
    """grad_z[i, ids[i, j] - vocab_start] += grads[i, j] for the ids inside this shard."""
    if not global_ids.shape[-1]:
        return
    local_ids = global_ids - vocab_start
    in_shard = (local_ids >= 0) & (local_ids < grad_z.shape[-1])
    source = torch.where(in_shard, grads.to(grad_z.dtype), grad_z.new_zeros(()))
    grad_z.scatter_add_(-1, local_ids.clamp(0, grad_z.shape[-1] - 1), source)


def _grad_logits_chunk(
    z: torch.Tensor,
    logsumexp: torch.Tensor,
    topk_ids: torch.Tensor,
    grad_topk: torch.Tensor,
    gather_ids: torch.Tensor,
    grad_gathered: torch.Tensor,
    grad_logsumexp: torch.Tensor,
    vocab_start: int,
) -> torch.Tensor:
    """grad_z = sum_i onehot(i) g_i - p * (sum_i g_i - g_lse), p = exp(z - lse) (module doc)."""
    softmax_coefficient = grad_logsumexp - grad_topk.sum(-1) - grad_gathered.sum(-1)
    grad_z = (z - logsumexp.unsqueeze(-1)).exp_()  # p; the only [c, V_local] temporary besides z
    grad_z.mul_(softmax_coefficient.to(grad_z.dtype).unsqueeze(-1))
    _scatter_add_local_(grad_z, topk_ids, grad_topk, vocab_start)
    _scatter_add_local_(grad_z, gather_ids, grad_gathered, vocab_start)
    return grad_z


def _hidden_chunk_logits(
    hidden: torch.Tensor, weight_shard: torch.Tensor, plan: ChunkPlan, start: int, end: int
) -> torch.Tensor:
    """Masked compute-dtype logits of rows [start, end): matmul in the input dtype, then up-cast."""
    logits = (hidden[start:end] @ weight_shard.T).to(compute_dtype_for(hidden.dtype))
    return mask_padded_columns(logits, plan.vocab_start, plan.vocab_size)


def _logits_chunk(logits_shard: torch.Tensor, plan: ChunkPlan, start: int, end: int) -> torch.Tensor:
    """Masked compute-dtype copy (or alias) of rows [start, end) of a logits shard."""
    return masked_compute_logits(logits_shard[start:end], plan.vocab_start, plan.vocab_size)


def _chunk_bounds(n_rows: int, chunk_size: int):
    return [(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size)]


def _forward_all_chunks(
    chunk_logits: Callable[[int, int], torch.Tensor],
    n_rows: int,
    gather_ids: torch.Tensor,
    plan: ChunkPlan,
    compute_dtype: torch.dtype,
    device: torch.device,
):
    """Run :func:`_forward_chunk` over all chunks; keep only the [N, K]-sized outputs."""
    topk_ids = torch.empty((n_rows, plan.k), dtype=torch.long, device=device)
    topk_logprobs = torch.empty((n_rows, plan.k), dtype=compute_dtype, device=device)
    logsumexp = torch.empty((n_rows,), dtype=compute_dtype, device=device)
    gathered = torch.empty((n_rows, gather_ids.shape[-1]), dtype=compute_dtype, device=device)
    for start, end in _chunk_bounds(n_rows, plan.chunk_size):
        outputs = _forward_chunk(chunk_logits(start, end), gather_ids[start:end], plan)
        for full, part in zip((logsumexp, topk_ids, topk_logprobs, gathered), outputs):
            full[start:end] = part
    return topk_ids, topk_logprobs, logsumexp, gathered


def _grads_of_all_chunks(
    chunk_logits: Callable[[int, int], torch.Tensor],
    plan: ChunkPlan,
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grad_topk: torch.Tensor,
    grad_logsumexp: torch.Tensor,
    grad_gathered: torch.Tensor,
):
    """Yield (start, end, grad_z) per chunk, recomputing each chunk's logits."""
    topk_ids, gather_ids, logsumexp = saved
    for start, end in _chunk_bounds(logsumexp.shape[0], plan.chunk_size):
        # Yielded without a local name, so the consumer's `del` frees it before the next chunk.
        yield start, end, _grad_logits_chunk(
            chunk_logits(start, end),
            logsumexp[start:end],
            topk_ids[start:end],
            grad_topk[start:end],
            gather_ids[start:end],
            grad_gathered[start:end],
            grad_logsumexp[start:end],
            plan.vocab_start,
        )


# ----------------------------------------------------------------------------- autograd Functions


def _keeping(chunk_logits: Callable[[int, int], torch.Tensor], kept: list) -> Callable[[int, int], torch.Tensor]:
    """``chunk_logits`` that also appends every chunk it computes to ``kept``."""

    def compute_and_keep(start: int, end: int) -> torch.Tensor:
        kept.append(chunk_logits(start, end))
        return kept[-1]

    return compute_and_keep


class ChunkedLogitsTopK(torch.autograd.Function):
    """Chunked top-K / gather / logsumexp from logits [N, V_local]; backward recomputes softmax.

    forward(logits_shard, gather_ids [N, Kg], plan) ->
        (topk_ids [N, k], topk_logprobs [N, k], logsumexp [N], gathered_logprobs [N, Kg]).
    """

    @staticmethod
    def forward(ctx, logits_shard: torch.Tensor, gather_ids: torch.Tensor, plan: ChunkPlan):
        chunk_logits = partial(_logits_chunk, logits_shard, plan)
        compute_dtype = compute_dtype_for(logits_shard.dtype)
        outputs = _forward_all_chunks(
            chunk_logits, logits_shard.shape[0], gather_ids, plan, compute_dtype, logits_shard.device
        )
        ctx.save_for_backward(logits_shard, outputs[0], gather_ids, outputs[2])
        ctx.plan = plan
        ctx.mark_non_differentiable(outputs[0])
        return outputs

    @staticmethod
    def backward(ctx, _grad_ids, grad_topk, grad_logsumexp, grad_gathered):
        logits_shard, topk_ids, gather_ids, logsumexp = ctx.saved_tensors
        plan = ctx.plan
        chunk_logits = partial(_logits_chunk, logits_shard, plan)

        grad_logits = torch.empty_like(logits_shard)
        saved = (topk_ids, gather_ids, logsumexp)
        grads = (grad_topk, grad_logsumexp, grad_gathered)
        for start, end, grad_z in _grads_of_all_chunks(chunk_logits, plan, saved, *grads):
            grad_logits[start:end] = grad_z
            del grad_z  # free before the generator builds the next chunk (peak = 2 chunks)
        return grad_logits, None, None


class ChunkedHiddenTopK(torch.autograd.Function):
    """Like :class:`ChunkedLogitsTopK` but the logits are hidden @ weight_shard^T per chunk.

    forward(hidden [N, H], weight_shard [V_local, H], gather_ids [N, Kg], plan,
    all_reduce_grad_hidden, keep_logits) -> same four outputs. Backward returns grad_hidden
    (all-reduced over plan.group if asked, see module docstring) and the local
    grad_weight_shard. ``keep_logits``: save every chunk's masked logits for the backward
    instead of recomputing them (one matmul less, N x V_local compute-dtype bytes more).
    """

    @staticmethod
    def forward(ctx, hidden, weight_shard, gather_ids, plan: ChunkPlan, all_reduce_grad_hidden,
                keep_logits: bool = False):
        compute_dtype = compute_dtype_for(hidden.dtype)
        chunk_logits = partial(_hidden_chunk_logits, hidden, weight_shard, plan)
        kept: list[torch.Tensor] = []
        if keep_logits:
            chunk_logits = _keeping(chunk_logits, kept)
        outputs = _forward_all_chunks(
            chunk_logits, hidden.shape[0], gather_ids, plan, compute_dtype, hidden.device
        )
        ctx.save_for_backward(hidden, weight_shard, outputs[0], gather_ids, outputs[2], *kept)
        ctx.plan = plan
        ctx.all_reduce_grad_hidden = all_reduce_grad_hidden
        ctx.mark_non_differentiable(outputs[0])
        return outputs

    @staticmethod
    def backward(ctx, _grad_ids, grad_topk, grad_logsumexp, grad_gathered):
        hidden, weight_shard, topk_ids, gather_ids, logsumexp, *kept = ctx.saved_tensors
        plan, compute_dtype = ctx.plan, compute_dtype_for(hidden.dtype)
        chunk_logits = partial(_hidden_chunk_logits, hidden, weight_shard, plan)
        if kept:
            chunk_logits = lambda start, end: kept[start // plan.chunk_size]  # noqa: E731
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=compute_dtype) if want_hidden else None
        grad_weight = (
            weight_shard.new_zeros(weight_shard.shape, dtype=compute_dtype) if want_weight else None
        )
        saved = (topk_ids, gather_ids, logsumexp)
        grads = (grad_topk, grad_logsumexp, grad_gathered)
        for start, end, grad_z in _grads_of_all_chunks(chunk_logits, plan, saved, *grads):
            if want_hidden:
                grad_hidden[start:end] = grad_z.to(weight_shard.dtype) @ weight_shard
            if want_weight:
                grad_weight.addmm_(grad_z.T, hidden[start:end].to(compute_dtype))
            del grad_z  # free before the generator builds the next chunk (peak = 2 chunks)
        if want_hidden and ctx.all_reduce_grad_hidden and plan.group is not None:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=plan.group)
        grad_hidden = grad_hidden.to(hidden.dtype) if want_hidden else None
        grad_weight = grad_weight.to(weight_shard.dtype) if want_weight else None
        return grad_hidden, grad_weight, None, None, None, None


# ----------------------------------------------------------------------------- public wrappers


def _combined_gather_ids(lead_shape, gather_ids, sampled_ids, vocab: int, device) -> torch.Tensor:
    """[N, Kg (+1 for sampled_ids)] int64 ids; validates shapes against the token dims."""
    n_rows = int(torch.Size(lead_shape).numel())
    columns = []
    for name, ids, extra_dims in (("gather_ids", gather_ids, 1), ("sampled_ids", sampled_ids, 0)):
        if ids is None:
            continue
        shape_ok = isinstance(ids, torch.Tensor) and ids.dim() == len(lead_shape) + extra_dims
        if not shape_ok or tuple(ids.shape[: len(lead_shape)]) != tuple(lead_shape):
            want = "[..., Kg]" if extra_dims else "[...]"
            raise ValueError(f"{name} must have shape {want} with ... = {tuple(lead_shape)}")
        flat = ids.reshape(n_rows, -1)
        check_token_ids(flat, n_rows, vocab, name)
        columns.append(flat.long())
    if not columns:
        return torch.empty((n_rows, 0), dtype=torch.long, device=device)
    return torch.cat(columns, dim=-1)


def _package(outputs, lead_shape, k, gather_ids, sampled_ids) -> TopKLogprobs:
    topk_ids, topk_logprobs, logsumexp, gathered = outputs
    n_gather = 0 if gather_ids is None else gather_ids.shape[-1]
    return TopKLogprobs(
        topk_ids=topk_ids.reshape(*lead_shape, k) if k else None,
        topk_logprobs=topk_logprobs.reshape(*lead_shape, k) if k else None,
        logsumexp=logsumexp.reshape(lead_shape),
        gathered_logprobs=(
            None if gather_ids is None else gathered[:, :n_gather].reshape(*lead_shape, n_gather)
        ),
        sampled_logprobs=(
            None if sampled_ids is None else gathered[:, n_gather].reshape(lead_shape)
        ),
    )


def _plan(k, chunk_size, group, vocab_start, vocab_size, vocab: int) -> ChunkPlan:
    if k is not None:
        check_k(k, vocab)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return ChunkPlan(int(k or 0), int(chunk_size), group, int(vocab_start), vocab_size)


DEFAULT_CHUNK_BYTES = 128 * 2**20
"""Default size of one [chunk, V_local] compute-dtype logits tensor (see :func:`rows_per_chunk`)."""


def rows_per_chunk(vocab_local: int, dtype: torch.dtype, max_rows: int = 1024,
                   max_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk such that one [chunk, V_local] logits tensor in the compute dtype of
    ``dtype`` stays within ``max_bytes`` (at most ``max_rows``, at least 16): the chunked paths'
    peak is a few such tensors, whatever the vocabulary (151936 x fp32: 220 rows per 128 MiB)."""
    itemsize = compute_dtype_for(dtype).itemsize
    return max(16, min(int(max_rows), int(max_bytes) // max(1, int(vocab_local) * itemsize)))


def chunked_topk_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    *,
    k: int | None = None,
    gather_ids: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    all_reduce_grad_hidden: bool = True,
    keep_logits_max_bytes: int = 0,
) -> TopKLogprobs:
    """Top-K / log-probs of ``softmax(hidden @ weight_shard^T)`` without storing the logits.

    ``hidden`` [..., H] (replicated on every rank of ``group``), ``weight_shard``
    [V_local, H] holding global ids [vocab_start, vocab_start + V_local); ``gather_ids``
    [..., Kg] and ``sampled_ids`` [...] are global ids. Returns :class:`TopKLogprobs`.
    Gradients flow to ``hidden`` (all-reduced over ``group`` unless
    ``all_reduce_grad_hidden=False``, see module docstring) and to ``weight_shard``.
    ``keep_logits_max_bytes``: when all N x V_local compute-dtype logits fit in this many
    bytes and a backward will follow, they are kept for it instead of recomputed (saves one
    [N, H] x [H, V_local] matmul; 0 = always recompute, the memory-bounded default).
    """
    if hidden.dim() < 1 or weight_shard.dim() != 2 or hidden.shape[-1] != weight_shard.shape[1]:
        raise ValueError(
            f"hidden [..., H] and weight_shard [V_local, H] must share H; got "
            f"{tuple(hidden.shape)} and {tuple(weight_shard.shape)}"
        )
    if hidden.dtype != weight_shard.dtype or not hidden.is_floating_point():
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight_shard ({weight_shard.dtype}) must share a float dtype"
        )
    check_vocab_layout(weight_shard.shape[0], vocab_start, vocab_size, group)
    vocab = effective_vocab_size(weight_shard.shape[0], group, vocab_size)
    lead_shape = hidden.shape[:-1]
    plan = _plan(k, chunk_size, group, vocab_start, vocab_size, vocab)
    ids = _combined_gather_ids(lead_shape, gather_ids, sampled_ids, vocab, hidden.device)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    logits_bytes = flat_hidden.shape[0] * weight_shard.shape[0] * compute_dtype_for(hidden.dtype).itemsize
    keep = (torch.is_grad_enabled() and (hidden.requires_grad or weight_shard.requires_grad)
            and logits_bytes <= keep_logits_max_bytes)
    outputs = ChunkedHiddenTopK.apply(flat_hidden, weight_shard, ids, plan, all_reduce_grad_hidden, keep)
    return _package(outputs, lead_shape, plan.k, gather_ids, sampled_ids)


def chunked_topk_logprobs_from_logits(
    logits_shard: torch.Tensor,
    *,
    k: int | None = None,
    gather_ids: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> TopKLogprobs:
    """Same as :func:`chunked_topk_logprobs_from_hidden` for ``logits_shard`` [..., V_local].

    Saves only a reference to the logits; the backward rebuilds each chunk's softmax and
    writes grad_logits (this rank's shard, input dtype; no reduction needed).
    """
    if not isinstance(logits_shard, torch.Tensor) or logits_shard.dim() < 1:
        raise ValueError("logits_shard must be a tensor [..., V_local]")
    flat_logits = logits_shard.reshape(-1, logits_shard.shape[-1])
    check_logits_shard(flat_logits, vocab_start, vocab_size, group)
    vocab = effective_vocab_size(flat_logits.shape[1], group, vocab_size)
    lead_shape = logits_shard.shape[:-1]
    plan = _plan(k, chunk_size, group, vocab_start, vocab_size, vocab)
    ids = _combined_gather_ids(lead_shape, gather_ids, sampled_ids, vocab, logits_shard.device)
    outputs = ChunkedLogitsTopK.apply(flat_logits, ids, plan)
    return _package(outputs, lead_shape, plan.k, gather_ids, sampled_ids)
