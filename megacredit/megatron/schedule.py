"""Forward/backward over micro-batches for a Megatron GPTModel at any TP x PP x DP layout.

A thin layer over Megatron's ``get_forward_backward_func()`` (no pipelining, 1F1B, or the
interleaved schedule, chosen by Megatron from the PP/VPP sizes). The caller supplies the
micro-batches and a loss callback; this module builds position ids and the explicit causal
mask (``cpu_compat.causal_attention_mask``; Megatron's default mask is hard-coded to CUDA), runs
the schedule and returns per-micro-batch results.

Loss callback
-------------
``loss_fn(output_tensor, batch) -> (loss, metrics)`` runs on the LAST pipeline stage only.

* ``output_tensor``: the model output, logits ``[B, S, V / TP]`` -- the vocab dimension is this
  tensor-parallel rank's shard (use ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``
  or gather it). Columns beyond the real vocabulary (padding to a multiple of TP) may be present;
  :func:`mask_padded_vocab` sets them to -inf.
* ``batch``: the micro-batch mapping exactly as passed in (extra keys such as labels, loss masks,
  advantages or teacher log-probs travel with it).
* ``loss``: a 0-dim tensor, this micro-batch's ADDITIVE SHARE of the global objective, i.e.
  ``global_loss = sum over DP ranks and micro-batches of loss`` (``megacredit.algorithms.losses.
  aggregate(..., global_denominator=...)`` returns exactly such shares).
* ``metrics``: a dict of tensors/floats (detached by this module), returned per micro-batch.

Getting the full-batch gradient (Megatron 0.16 semantics, read in
``megatron/core/pipeline_parallel/schedules.py::forward_step_calc_loss`` and
``megatron/core/distributed/distributed_data_parallel.py``): with the model config's
``calculate_per_token_loss=False`` (the default) the schedule divides a ``(loss, metrics)``
2-tuple by ``num_microbatches`` (times the context-parallel size, 1 here), and Megatron DDP
pre-scales every gradient by ``1 / dp_size`` before its all-reduce (it AVERAGES over DP). So the
loss handed to Megatron is ``share * num_microbatches * dp_size``: after the two divisions the
accumulated, reduced gradient is ``d/dtheta sum_{dp, mb} share`` -- the gradient of the
single-process full-batch loss (tested against TP=1 in tests/distributed/
test_parallel_equivalence.py). The value returned in ``metrics["loss"]`` is the unscaled share.
Without a DDP wrapper (a bare GPTModel) nothing is averaged, so only ``num_microbatches`` is
compensated and each rank keeps its local gradient. ``calculate_per_token_loss=True`` (Megatron's
3-tuple convention, division by the all-reduced token count) is rejected: shares already carry
the global denominator.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from megacredit.megatron import cpu_compat

LossFn = Callable[[torch.Tensor, Mapping[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
"""``loss_fn(output_tensor, batch) -> (additive loss share, metrics)``; see the module docstring."""


def _as_chunk_list(model_chunks: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    if isinstance(model_chunks, torch.nn.Module):
        return [model_chunks]
    chunks = list(model_chunks)
    if not chunks:
        raise ValueError("forward_backward: model_chunks is empty")
    return chunks


def _micro_batch_shape(micro_batches: Sequence[Mapping[str, Any]], pipelined: bool) -> tuple[int, int]:
    """(micro_batch_size, seq_length) of the micro-batches; PP needs one shape for all."""
    if not micro_batches:
        raise ValueError("forward_backward: micro_batches is empty; pass at least one micro-batch")
    shapes = []
    for index, batch in enumerate(micro_batches):
        if "input_ids" not in batch:
            raise KeyError(f"micro_batches[{index}] has no 'input_ids' ([batch, seq] token ids)")
        ids = batch["input_ids"]
        if ids.dim() != 2:
            raise ValueError(f"micro_batches[{index}]['input_ids'] must be [batch, seq], got {tuple(ids.shape)}")
        shapes.append(tuple(ids.shape))
    if pipelined and len(set(shapes)) > 1:
        raise ValueError(
            f"pipeline parallelism needs every micro-batch to have the same [batch, seq] shape, got "
            f"{sorted(set(shapes))}; pad the micro-batches to one length"
        )
    return shapes[0]


def model_inputs(batch: Mapping[str, Any], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids`` (default ``arange``) and ``attention_mask`` (default causal).

    A batch may carry its own ``position_ids`` [B, S] and ``attention_mask`` ([B or 1, 1, S, S],
    True = masked), e.g. for packed sequences.
    """
    device = device or cpu_compat.device()
    input_ids = batch["input_ids"].to(device)
    seq_length = input_ids.shape[1]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq_length, device=device).unsqueeze(0).expand_as(input_ids)
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = cpu_compat.causal_attention_mask(seq_length, device)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids.to(device),
        "attention_mask": attention_mask.to(device),
    }


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocabulary entries (global id >= ``vocab_size``) to -inf.

    ``logits`` is this TP rank's vocab shard ``[..., V_padded / TP]``; returns a new tensor.
    """
    from megatron.core import parallel_state

    shard = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    valid = max(0, min(shard, vocab_size - first))
    if valid == shard:
        return logits
    padding = torch.zeros(shard, dtype=torch.bool, device=logits.device)
    padding[valid:] = True
    return logits.masked_fill(padding, float("-inf"))


def next_token_cross_entropy(vocab_size: int, global_num_tokens: int | float) -> LossFn:
    """A ``loss_fn`` for token-mean cross entropy over the WHOLE batch (SFT, sanity checks).

    The batch needs ``labels`` [B, S]: the target id at each position, -100 where no loss is
    taken. The share is ``sum(CE over this micro-batch's valid labels) / global_num_tokens``,
    where ``global_num_tokens`` counts the valid labels of all micro-batches on all DP ranks.
    Logits of padded vocabulary entries are masked (:func:`mask_padded_vocab`).
    """
    from megatron.core import tensor_parallel

    if global_num_tokens <= 0:
        raise ValueError(f"global_num_tokens must be > 0, got {global_num_tokens}")

    def loss_fn(output_tensor: torch.Tensor, batch: Mapping[str, Any]):
        labels = batch["labels"].to(output_tensor.device)
        valid = labels != -100
        logits = mask_padded_vocab(output_tensor.float(), vocab_size)
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.clamp(min=0))
        loss_sum = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
        return loss_sum / global_num_tokens, {"loss_sum": loss_sum, "num_tokens": valid.sum()}

    return loss_fn


def _detach_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


def _loss_scale(chunks: list[torch.nn.Module], num_microbatches: int) -> float:
    """Factor that cancels the schedule's 1/num_microbatches and DDP's 1/dp (module docstring)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.utils import get_model_config

    if get_model_config(chunks[0]).calculate_per_token_loss:
        raise ValueError(
            "forward_backward expects the model config's calculate_per_token_loss=False: the loss "
            "callback returns shares that already carry the global denominator"
        )
    averaged_over_dp = isinstance(chunks[0], DistributedDataParallel)
    dp_size = parallel_state.get_data_parallel_world_size() if averaged_over_dp else 1
    return float(num_microbatches * dp_size)


def _make_forward_step(loss_fn: LossFn, loss_scale: float) -> Callable:
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        inputs = model_inputs(batch)
        output_tensor = model(inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"])

        def reduce(output: torch.Tensor):
            loss, metrics = loss_fn(output, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(f"loss_fn must return a 0-dim tensor as its loss, got {type(loss).__name__}"
                                f"{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
            reported = {"loss": loss.detach().clone(), **_detach_metrics(metrics)}
            # A fresh tensor: Megatron divides it in place by num_microbatches.
            return loss * loss_scale, reported

        return output_tensor, reduce

    return forward_step


def _broadcast_from_last_stage(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return results
    group = parallel_state.get_pipeline_model_parallel_group()
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    holder = [results if parallel_state.is_pipeline_last_stage() else None]
    torch.distributed.broadcast_object_list(holder, src=last_rank, group=group)
    return holder[0]


def forward_backward(
    model_chunks: torch.nn.Module | Sequence[torch.nn.Module],
    micro_batches: Sequence[Mapping[str, Any]],
    loss_fn: LossFn,
    forward_only: bool = False,
    broadcast_results: bool = True,
) -> list[dict[str, Any]]:
    """Run forward (and backward) over ``micro_batches`` with Megatron's pipeline schedule.

    Args:
        model_chunks: this rank's GPTModel chunk(s), DDP-wrapped for training
            (``optimizer.wrap_with_ddp``); gradients accumulate into the DDP grad buffers and are
            reduced over DP at the end (call ``optimizer.zero_grads`` before).
        micro_batches: one mapping per micro-batch with ``input_ids`` [B, S] and, optionally,
            ``position_ids`` and ``attention_mask`` (see :func:`model_inputs`) plus anything the
            loss needs. Every rank passes the micro-batches of its DP replica.
        loss_fn: ``(output_tensor, batch) -> (loss share, metrics)``, see the module docstring.
        forward_only: no backward (evaluation, log-prob computation).
        broadcast_results: send the last stage's results to every pipeline stage; otherwise the
            other stages get an empty list.

    Returns:
        One dict per micro-batch: ``{"loss": unscaled share, **metrics}``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core import parallel_state

    chunks = _as_chunk_list(model_chunks)
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    micro_batch_size, seq_length = _micro_batch_shape(micro_batches, pipelined)
    num_microbatches = len(micro_batches)
    scale = 1.0 if forward_only else _loss_scale(chunks, num_microbatches)
    data_iterator: Any = iter(micro_batches)
    if len(chunks) > 1:
        data_iterator = [iter(micro_batches) for _ in chunks]
    results = get_forward_backward_func()(
        forward_step_func=_make_forward_step(loss_fn, scale),
        data_iterator=data_iterator,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    results = list(results) if parallel_state.is_pipeline_last_stage() else []
    if broadcast_results:
        results = _broadcast_from_last_stage(results)
    return results
