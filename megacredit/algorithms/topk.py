"""Vocab-parallel log-softmax primitives: logsumexp, global top-K, log-probs at ids, tail mass.

Layout convention (the one Megatron's ``ColumnParallelLinear`` output layer produces): each of
the ``TP`` ranks of ``group`` holds ``logits_shard`` of shape ``[N, V_local]`` whose column ``j``
is the logit of global token id ``vocab_start + j``. The padded global vocabulary is
``TP * V_local`` (equal shards, as Megatron and Transformer Engine require); when the real
vocabulary is smaller, pass its size as ``vocab_size`` and every column whose global id is
``>= vocab_size`` is treated as ``-inf`` (probability exactly 0, gradient exactly 0).

``group=None`` means a single process holding the whole vocabulary: no collective is issued.

Communication per call (``TP > 1``), all on ``group``:

* ``vocab_parallel_logsumexp``: all-reduce MAX of ``[N]`` (no gradient through it; the
  logsumexp does not depend on the shift), then all-reduce SUM of ``[N]`` sum-exp.
* ``vocab_parallel_topk``: the two all-reduces above, all-gather of ``[N, K]`` values and
  ``[N, K]`` ids (K x TP candidates, then a second top-K), and an all-reduce SUM of ``[N, K]``
  to re-gather the chosen logits with autograd.
* ``vocab_parallel_logprobs_at``: the two logsumexp all-reduces and an all-reduce SUM of
  ``[N, K]`` masked local gathers.

Gradients (when ``logits_shard`` requires grad): every SUM all-reduce is the autograd function
:class:`AllReduceSumIdentityBackward`, i.e. forward = all-reduce, backward = identity. This is
Megatron's ``reduce_from_tensor_model_parallel_region`` convention: every rank computes the
same (replicated) loss from the reduced values, and the gradient of that single loss w.r.t. a
rank's own shard is obtained by back-propagating its local copy -- no reduction in backward.
The resulting shard gradients equal the matching columns of the TP=1 gradient (tested).

Compute precision: bfloat16/float16/float32 logits are up-cast to float32, float64 stays
float64. The unchunked functions here up-cast the whole shard; the memory-bounded chunked
paths live in :mod:`megacredit.algorithms.topk_fused`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- communication


def group_world_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks sharing the vocabulary (1 when ``group`` is None)."""
    return 1 if group is None else dist.get_world_size(group)


class AllReduceSumIdentityBackward(torch.autograd.Function):
    """All-reduce SUM in forward, identity in backward (Megatron's reduce-from-TP-region).

    Correct when every rank then computes the same loss from the reduced tensor: the gradient
    of that loss w.r.t. this rank's summand is the gradient w.r.t. the sum itself.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        reduced = local.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def backward(ctx, grad_reduced: torch.Tensor):
        return grad_reduced, None


def all_reduce_sum(local: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """SUM over ``group`` with identity backward; returns ``local`` itself when ``group`` is None."""
    if group is None:
        return local
    return AllReduceSumIdentityBackward.apply(local, group)


def all_reduce_max_(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place MAX over ``group`` of a tensor that carries no gradient; returns it."""
    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values


def all_gather_cat(local: torch.Tensor, group: dist.ProcessGroup | None, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``local`` (same shape on all ranks) along ``dim``; no gradient."""
    if group is None:
        return local
    pieces = [torch.empty_like(local) for _ in range(group_world_size(group))]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


# ----------------------------------------------------------------------------- validation


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_vocab_size(
    local_vocab: int, group: dist.ProcessGroup | None, vocab_size: int | None
) -> int:
    """The real vocabulary size: ``vocab_size`` if given, else ``TP * V_local`` (no padding)."""
    return vocab_size if vocab_size is not None else group_world_size(group) * local_vocab


def check_logits_shard(
    logits_shard: torch.Tensor,
    vocab_start: int,
    vocab_size: int | None,
    group: dist.ProcessGroup | None,
) -> None:
    """Raise ValueError naming the bad argument of a vocab-parallel call."""
    if not isinstance(logits_shard, torch.Tensor) or logits_shard.dim() != 2:
        raise ValueError(
            "logits_shard must be a 2-D tensor [N, V_local]; flatten the batch/sequence dims first"
            f" (got {getattr(logits_shard, 'shape', type(logits_shard))})"
        )
    if not logits_shard.is_floating_point():
        raise ValueError(f"logits_shard must be floating point, got {logits_shard.dtype}")
    check_vocab_layout(logits_shard.shape[1], vocab_start, vocab_size, group)


def check_vocab_layout(
    local_vocab: int, vocab_start: int, vocab_size: int | None, group: dist.ProcessGroup | None
) -> None:
    """Validate ``vocab_start``/``vocab_size`` against the shard width and the group size."""
    if local_vocab < 1:
        raise ValueError("the vocabulary shard is empty (V_local = 0)")
    if int(vocab_start) != vocab_start or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    padded = group_world_size(group) * local_vocab
    if vocab_size is not None and not (0 < vocab_size <= padded):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, TP * V_local = {padded}]: it is the real "
            "(unpadded) vocabulary size"
        )
    if group is None and vocab_start != 0:
        raise ValueError("vocab_start must be 0 when group is None (one shard holds the vocabulary)")


def check_token_ids(ids: torch.Tensor, n_rows: int, vocab: int, name: str) -> None:
    """``ids`` must be an integer tensor [N] or [N, K] of ids in [0, vocab)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an int64/int32 tensor of global token ids")
    if ids.dim() not in (1, 2) or ids.shape[0] != n_rows:
        raise ValueError(f"{name} must have shape [N] or [N, K] with N={n_rows}, got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{name} holds ids outside [0, {vocab}); pass global (not shard-local) ids of real tokens"
        )


def check_k(k: int, vocab: int) -> None:
    if int(k) != k or not (1 <= k <= vocab):
        raise ValueError(f"k={k!r} must be an int in [1, vocab_size={vocab}]")


# ----------------------------------------------------------------------------- building blocks


def mask_padded_columns(
    logits: torch.Tensor, vocab_start: int, vocab_size: int | None
) -> torch.Tensor:
    """Out-of-place: columns whose global id is >= ``vocab_size`` become -inf."""
    if vocab_size is None or vocab_start + logits.shape[-1] <= vocab_size:
        return logits
    n_real = max(0, vocab_size - vocab_start)
    column = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(column >= n_real, float("-inf"))


def masked_compute_logits(
    logits_shard: torch.Tensor, vocab_start: int, vocab_size: int | None
) -> torch.Tensor:
    """Shard up-cast to the compute dtype with padded columns at -inf (may alias the input)."""
    upcast = logits_shard.to(compute_dtype_for(logits_shard.dtype))
    return mask_padded_columns(upcast, vocab_start, vocab_size)


def logsumexp_of_masked(z: torch.Tensor, group) -> torch.Tensor:
    """Global log sum_v exp(z_v) of a masked shard ``z`` [N, V_local] -> [N] (differentiable)."""
    with torch.no_grad():
        row_max = all_reduce_max_(z.amax(dim=-1), group)
        # A row that is -inf everywhere has no finite shift; 0 keeps exp() NaN-free.
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    local_sum_exp = (z - row_max.unsqueeze(-1)).exp_().sum(dim=-1)  # one [N, V_local] temporary
    return row_max + torch.log(all_reduce_sum(local_sum_exp, group))


def gather_logits_of_masked(
    z: torch.Tensor, global_ids: torch.Tensor, group, vocab_start: int
) -> torch.Tensor:
    """z at global ids [N, K]: masked local gather, zeros elsewhere, all-reduce SUM."""
    local_ids = global_ids.long() - vocab_start
    in_shard = (local_ids >= 0) & (local_ids < z.shape[-1])
    picked = z.gather(-1, local_ids.clamp(0, z.shape[-1] - 1))
    local_part = torch.where(in_shard, picked, torch.zeros_like(picked))
    return all_reduce_sum(local_part, group)


@torch.no_grad()
def topk_of_masked(
    z: torch.Tensor, k: int, group, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-``k`` (values, global ids) of a masked shard, sorted by descending value.

    Local top-min(k, V_local) padded to k with -inf, all-gather of the K x TP candidates,
    second top-K. Ties are broken identically on every rank (same candidates, same order).
    """
    local_k = min(k, z.shape[-1])
    values, local_ids = z.topk(local_k, dim=-1)
    global_ids = local_ids + vocab_start
    if local_k < k:
        fill = (z.shape[0], k - local_k)
        values = torch.cat([values, values.new_full(fill, float("-inf"))], dim=-1)
        global_ids = torch.cat([global_ids, global_ids.new_full(fill, -1)], dim=-1)
    if group is None:
        return values, global_ids
    candidate_values = all_gather_cat(values, group, dim=-1)
    candidate_ids = all_gather_cat(global_ids, group, dim=-1)
    top_values, position = candidate_values.topk(k, dim=-1)
    return top_values, candidate_ids.gather(-1, position)


# ----------------------------------------------------------------------------- public API


def vocab_parallel_logsumexp(
    logits_shard: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log sum over the full (real) vocabulary of exp(logits), shape [N], differentiable.

    All-reduce MAX of the row maxima, then all-reduce SUM of sum-exp (see module docstring).
    """
    check_logits_shard(logits_shard, vocab_start, vocab_size, group)
    z = masked_compute_logits(logits_shard, vocab_start, vocab_size)
    return logsumexp_of_masked(z, group)


def vocab_parallel_logprobs_at(
    logits_shard: torch.Tensor,
    global_ids: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits)[global_ids] normalised over the full vocabulary, differentiable.

    ``global_ids`` [N, K] (or [N], giving [N]) are global token ids in [0, vocab_size).
    Masked local gather + all-reduce SUM, minus the global logsumexp.
    """
    check_logits_shard(logits_shard, vocab_start, vocab_size, group)
    vocab = effective_vocab_size(logits_shard.shape[1], group, vocab_size)
    check_token_ids(global_ids, logits_shard.shape[0], vocab, "global_ids")
    z = masked_compute_logits(logits_shard, vocab_start, vocab_size)
    ids_2d = global_ids.unsqueeze(-1) if global_ids.dim() == 1 else global_ids
    logprobs = gather_logits_of_masked(z, ids_2d, group, vocab_start) - logsumexp_of_masked(
        z, group
    ).unsqueeze(-1)
    return logprobs.squeeze(-1) if global_ids.dim() == 1 else logprobs


def vocab_parallel_topk(
    logits_shard: torch.Tensor,
    k: int,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-``k`` of log softmax over the full vocabulary.

    Returns ``(global_ids [N, k] int64, logprobs [N, k])`` sorted by descending log-prob. The
    ids carry no gradient; the log-probs are differentiable w.r.t. ``logits_shard`` (they are
    re-gathered at the chosen ids, one extra all-reduce of [N, k]).
    """
    check_logits_shard(logits_shard, vocab_start, vocab_size, group)
    check_k(k, effective_vocab_size(logits_shard.shape[1], group, vocab_size))
    z = masked_compute_logits(logits_shard, vocab_start, vocab_size)
    _, global_ids = topk_of_masked(z.detach(), k, group, vocab_start)
    logsumexp = logsumexp_of_masked(z, group)
    logprobs = gather_logits_of_masked(z, global_ids, group, vocab_start) - logsumexp.unsqueeze(-1)
    return global_ids, logprobs


def log_one_minus_exp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, stably (Maechler's log1mexp).

    ``a`` is clamped to ``<= -eps(dtype)`` first, so a mass that rounds to (or slightly above)
    1 gives log(eps) ~ -36.0 (float64) / -15.9 (float32) instead of NaN or -inf: the tail mass
    is not resolvable below the rounding error of the sum anyway.
    """
    eps = torch.finfo(log_mass.dtype).eps
    a = log_mass.clamp(max=-eps)
    near_zero = a > -0.6931471805599453  # -log(2): switch point of the two stable forms
    from_expm1 = torch.log(-torch.expm1(torch.where(near_zero, a, torch.full_like(a, -1.0))))
    from_log1p = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(a, -1.0), a)))
    return torch.where(near_zero, from_expm1, from_log1p)


def log_tail_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k exp(topk_logprobs)) over the last dim: the log-mass outside the top-K.

    ``topk_logprobs`` [..., K] are normalised full-vocabulary log-probs (e.g. from
    :func:`vocab_parallel_topk`); returns [...]. Stable for both tiny and near-1 top-K mass
    (see :func:`log_one_minus_exp`); never NaN.
    """
    return log_one_minus_exp(torch.logsumexp(topk_logprobs, dim=-1))
