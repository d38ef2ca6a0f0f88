"""Running packed micro-batches through Megatron's schedules with an RL head on the last stage.

The policy ``GPTModel`` is asked for its final hidden states instead of logits
(:func:`hidden_states_output`); the last pipeline stage then gathers the response positions of
every packed sequence and computes, with the chunked vocab-parallel top-K toolkit
(megacredit.algorithms.topk_fused), only [N_resp, K] results -- never a full-vocabulary logits
tensor. ``run_packed_schedule`` drives ``get_forward_backward_func()`` over a list of
:class:`PackedMicroBatch` for forward-only passes (teacher, contrastive, old policy) and for the
training pass (forward + backward), with one callback per micro-batch on the last stage.

Loss scaling
------------
The training callback returns this micro-batch's ADDITIVE SHARE of the global loss (numerator /
global denominator, ``megacredit.algorithms.losses.aggregate(..., global_denominator=...)``),
so that ``global_loss = sum over DP ranks and micro-batches of share``. Megatron 0.16 then
divides twice (read in ``megatron/core/pipeline_parallel/schedules.py::forward_step_calc_loss``
and ``megatron/core/distributed/distributed_data_parallel.py``): with the model config's
``calculate_per_token_loss=False`` (the default) the schedule divides a ``(loss, metrics)``
2-tuple's loss by ``num_microbatches`` (and multiplies it by the context-parallel size, 1
here), and Megatron DDP pre-scales every gradient by ``1 / dp_size`` before its all-reduce (it
AVERAGES over DP). So the loss handed to Megatron is ``share * num_microbatches * dp_size``:
after the two divisions the accumulated, reduced gradient is ``d/dtheta sum_{dp, mb} share`` --
the gradient of the global loss, what a single process computes on the whole batch (tested
against TP=1 at TP=2, PP=2 and DP=2 in tests/distributed/test_parallel_equivalence.py). The
caller passes ``dp_size``: the DP world size for DDP-wrapped chunks, 1 for a bare GPTModel
(nothing is averaged; each rank keeps its local gradient). ``calculate_per_token_loss=True``
(Megatron's 3-tuple convention, division by the all-reduced token count, no DP averaging) is
refused: shares already carry the global denominator. The metrics the callback returns are
collected as they are (unscaled).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from megacredit.algorithms.topk_fused import (
    TopKLogprobs,
    chunked_topk_logprobs_from_hidden,
    rows_per_chunk,
)
from megacredit.megatron.packed_attention import packed_seq_params
from megacredit.data.packing import PackedMicroBatch
from megacredit.utils.progress import ProgressReporter


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _identity_output_layer(hidden_states, weight=None, runtime_gather_output=None):
    return hidden_states, None


@contextlib.contextmanager
def hidden_states_output(model_chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Make the last stage's GPTModel return final-norm hidden states [b, s, h], not logits."""
    models = [unwrap(chunk) for chunk in model_chunks if unwrap(chunk).post_process]
    saved = [model.output_layer.forward for model in models]
    for model in models:
        model.output_layer.forward = _identity_output_layer
    try:
        yield
    finally:
        for model, forward in zip(models, saved):
            model.output_layer.forward = forward


class VocabHead:
    """The output projection of the last stage, applied through the chunked top-K toolkit."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], chunk_size: int = 1024,
                 keep_logits_max_bytes: int = 512 * 2**20, temperature: float = 1.0) -> None:
        from megatron.core import parallel_state

        self.model = unwrap(model_chunks[-1])
        self.chunk_size = chunk_size
        # Every result is of softmax(logits / temperature): the distribution the rollout sampled
        # from (as verl's actor does, dp_actor.py _forward_micro_batch: logits.div_(temperature)).
        self.temperature = temperature
        # Logits of a training call up to this size are kept for its backward, not recomputed.
        self.keep_logits_max_bytes = keep_logits_max_bytes
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.group = parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.sequence_parallel = bool(self.model.config.sequence_parallel)

    def weight(self) -> torch.Tensor:
        if self.model.share_embeddings_and_output_weights:
            return self.model.shared_embedding_or_output_weight()
        return self.model.output_layer.weight

    def __call__(self, hidden: torch.Tensor, *, k: int | None = None, gather_ids: torch.Tensor | None = None,
                 sampled_ids: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                 temperature: float | None = None) -> TopKLogprobs:
        """Top-K / log-probs of softmax(logits / temperature) at ``hidden`` (default: the head's
        temperature); ``weight`` replaces this rank's output-layer shard (e.g. the teacher's)."""
        weight = self.weight() if weight is None else weight
        temperature = self.temperature if temperature is None else temperature
        hidden = hidden.to(weight.dtype)
        if temperature != 1.0:  # (h W^T) / T = (h / T) W^T: the chunked head never holds [N, V]
            hidden = hidden / temperature
        return chunked_topk_logprobs_from_hidden(
            hidden, weight, k=k, gather_ids=gather_ids, sampled_ids=sampled_ids,
            chunk_size=rows_per_chunk(weight.shape[0], weight.dtype, max_rows=self.chunk_size),
            group=self.group, vocab_start=self.tp_rank * weight.shape[0],
            vocab_size=self.model.megacredit_vocab_size,
            # With sequence parallelism the hidden states were all-gathered (response_hidden), and
            # that gather's backward already reduce-scatters their gradient over the TP group
            # (gloo does both: tests/distributed/test_sequence_parallel.py).
            all_reduce_grad_hidden=not self.sequence_parallel, keep_logits_max_bytes=self.keep_logits_max_bytes,
        )


def response_hidden(output: torch.Tensor, micro_batch: PackedMicroBatch, sequence_parallel: bool = False) -> torch.Tensor:
    """[N_resp, h]: the last stage's hidden states at the positions that predict response tokens."""
    if sequence_parallel:  # [b, s/tp, h] -> [b, s, h]; the gather's backward reduce-scatters.
        from megatron.core import tensor_parallel

        output = tensor_parallel.gather_from_sequence_parallel_region(output.transpose(0, 1)).transpose(0, 1)
    return output[0, micro_batch.prediction_index.to(output.device)]


def row_length_multiple(model_chunks: Sequence[torch.nn.Module], token_budget: int) -> int:
    """What every packed row's length must be a multiple of: the token budget with pipeline
    parallelism (stages exchange fixed-shape activations), else the TP size with sequence
    parallelism (each TP rank holds an equal shard of the row), else 1."""
    config = unwrap(model_chunks[0]).config
    shards = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if len(model_chunks) * config.pipeline_model_parallel_size == 1:
        return shards
    if token_budget % shards:
        raise ValueError(f"parallel.micro_batch_tokens={token_budget} must be a multiple of "
                         f"parallel.tensor_model_parallel_size={shards} with sequence and pipeline parallelism")
    return token_budget


MicroBatchCallback = Callable[[torch.Tensor, PackedMicroBatch], Any]


def run_packed_schedule(
    model_chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence[PackedMicroBatch],
    callback: MicroBatchCallback,
    forward_only: bool,
    dp_size: int = 1,
    progress: ProgressReporter | None = None,
    description: str = "pass",
) -> list[Any]:
    """Run every packed micro-batch through Megatron's schedule; return the callback results.

    ``callback(response_hidden [N_resp, h], micro_batch)`` runs on the last pipeline stage. For
    forward-only passes it returns any data (collected in order); for training it returns
    ``(loss_share, metrics)`` with ``loss_share`` this micro-batch's additive share of the global
    loss. Other stages get an empty list. ``progress`` shows the micro-batches this rank has run
    forward, as ``description``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    if not forward_only and unwrap(model_chunks[0]).config.calculate_per_token_loss:
        raise ValueError("run_packed_schedule needs the model config's calculate_per_token_loss=False: the "
                         "callback returns loss shares that already carry the global denominator")
    num_microbatches = len(micro_batches)
    lengths = {mb.num_tokens for mb in micro_batches}
    if len(lengths) > 1 and len(model_chunks) * _pp_size() > 1:
        raise ValueError(f"pipeline parallelism needs equal packed lengths, got {sorted(lengths)}")
    device = next(model_chunks[0].parameters()).device
    config = unwrap(model_chunks[0]).config
    sequence_parallel = bool(config.sequence_parallel)
    if sequence_parallel and any(length % config.tensor_model_parallel_size for length in lengths):
        raise ValueError(f"sequence parallelism needs packed lengths that divide by TP="
                         f"{config.tensor_model_parallel_size}, got {sorted(lengths)} (pack with "
                         f"pad_to_multiple=row_length_multiple(...))")

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        output = model(
            micro_batch.tokens[None].to(device), micro_batch.position_ids[None].to(device), None,
            packed_seq_params=packed_seq_params(micro_batch.cu_seqlens.to(device)),
        )
        advance(1)

        def on_last_stage(output_tensor, non_loss_data: bool = False):
            result = callback(response_hidden(output_tensor, micro_batch, sequence_parallel), micro_batch)
            if forward_only:
                return result
            loss_share, metrics = result
            return loss_share * (num_microbatches * dp_size), metrics

        return output, on_last_stage

    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    shown = (progress or ProgressReporter()).task(description, num_microbatches * len(model_chunks), "micro-batches")
    with hidden_states_output(model_chunks), grad_mode, shown as advance:
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=list(model_chunks) if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=num_microbatches,
            seq_length=max(lengths),
            micro_batch_size=1,
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )
    return list(results or [])


def _pp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()
