"""Shared pieces of the Megatron multi-process tests (run inside spawned ranks).

A tiny random Llama-like config, a fixed token batch packed as prompt + response sequences, a
DDP + Adam training step through the production ``megacredit.megatron.rl_passes.
run_packed_schedule`` (loss: token-mean negative log-likelihood of the response tokens through
the production ``VocabHead``) and layout-independent probes (full-vocab logits gathered over TP,
broadcast from the last pipeline stage).
"""

from __future__ import annotations

import contextlib

import torch

VOCAB_SIZE = 101
SEQ_LENGTH = 12
NUM_SEQUENCES = 4
RESPONSE_STARTS = (1, 4)
"""Where the response starts in even / odd rows: 12 and 9 response tokens of the 13, so packed
micro-batches hold different numbers of loss tokens and a per-micro-batch (or per-replica) mean
would be wrong (the global denominator matters)."""


def tiny_llama_config(num_layers: int = 2):
    """hidden 64, 4 heads, 2 KV groups, vocab 101 (not a multiple of 128*TP: padding is real)."""
    from megacredit.models.tiny import tiny_config

    return tiny_config("llama", vocab_size=VOCAB_SIZE, num_hidden_layers=num_layers, initializer_range=0.1)


def fixed_tokens(seed: int = 0, num_sequences: int = NUM_SEQUENCES) -> torch.Tensor:
    """[num_sequences, SEQ_LENGTH + 1] token ids: each row one sequence (prompt then response)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (num_sequences, SEQ_LENGTH + 1), generator=generator)


def response_start(row: int) -> int:
    return RESPONSE_STARTS[row % 2]


def packed_rows(tokens: torch.Tensor, rows_per_micro_batch: int):
    """``tokens`` packed ``rows_per_micro_batch`` rows per micro-batch (``pack_sequences``); row
    ``i`` is one sequence whose response starts at :func:`response_start`."""
    from megacredit.data.packing import SequenceToPack, pack_sequences

    groups = [[SequenceToPack(("row", index), tuple(row.tolist()), response_start(index))]
              for index, row in enumerate(tokens)]
    return pack_sequences(groups, token_budget=rows_per_micro_batch * tokens.shape[1])


def dp_shard(batches: list, dp_rank: int, dp_size: int) -> list:
    """Micro-batches of one data-parallel replica (round robin)."""
    return batches[dp_rank::dp_size]


def build_model(ctx, num_layers: int = 2, **config_overrides):
    """This rank's tiny Llama stage, taking packed sequences (as the trainer builds it);
    ``config_overrides``: TransformerConfig fields (e.g. recompute settings)."""
    from megacredit.megatron.model_provider import build_gpt_model
    from megacredit.megatron.packed_attention import enable_packed_attention

    model = build_gpt_model(tiny_llama_config(num_layers), ctx, **config_overrides)
    enable_packed_attention(model)
    return [model]


def response_nll(chunks, num_loss_tokens: int):
    """``run_packed_schedule`` callback: this micro-batch's share ``-sum(log p(response token)) /
    num_loss_tokens`` of the global token-mean NLL, and ``{"loss": share}``."""
    from megacredit.megatron.rl_passes import VocabHead

    head = VocabHead(chunks)

    def callback(hidden: torch.Tensor, micro_batch):
        logprobs = head(hidden, sampled_ids=micro_batch.target_ids.to(hidden.device)).sampled_logprobs
        share = -logprobs.sum() / num_loss_tokens
        return share, {"loss": share.detach()}

    return callback


def schedule_loss(chunks, ctx, tokens: torch.Tensor, rows_per_micro_batch: int = 1,
                  forward_only: bool = False) -> float:
    """Run ``tokens`` (micro-batches split over DP) through ``run_packed_schedule`` with
    :func:`response_nll`; returns the global loss on every rank. Gradients accumulate into the
    DDP buffers unless ``forward_only``."""
    from megacredit.megatron.rl_passes import run_packed_schedule

    batches = packed_rows(tokens, rows_per_micro_batch)
    callback = response_nll(chunks, sum(len(batch.target_ids) for batch in batches))
    mine = dp_shard(batches, ctx.dp_rank, ctx.dp_size)
    results = run_packed_schedule(chunks, mine, callback, forward_only=forward_only, dp_size=ctx.dp_size)
    metrics = [metrics for _, metrics in results] if forward_only else results
    return global_loss([float(m["loss"]) for m in metrics])


def train_step(chunks, optimizer, ctx, tokens: torch.Tensor, rows_per_micro_batch: int = 1) -> float:
    """One full-batch step (micro-batches split over DP); returns the global loss."""
    from megacredit.megatron.optimizer import optimizer_step, zero_grads

    zero_grads(chunks, optimizer)
    loss = schedule_loss(chunks, ctx, tokens, rows_per_micro_batch)
    result = optimizer_step(optimizer)
    assert result.success, result
    return loss


def global_loss(shares: list[float]) -> float:
    """Sum of this replica's loss shares (held by the last pipeline stage), summed over DP,
    on every rank."""
    from megatron.core import parallel_state

    total = torch.tensor(sum(shares), dtype=torch.float64)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return float(total)


@contextlib.contextmanager
def grads_as_params(chunks):
    """Temporarily point every parameter's data at its DDP fp32 gradient (``main_grad``), so the
    bridge's export yields full HF-named gradients."""
    params = [p for chunk in chunks for p in chunk.parameters()]
    saved = [p.data for p in params]
    for param in params:
        param.data = param.main_grad
    try:
        yield
    finally:
        for param, data in zip(params, saved):
            param.data = data


def export_full(chunks, hf_config, ctx) -> dict[str, torch.Tensor]:
    """The model's full HF-named tensors (on global rank 0; every rank must call)."""
    from megacredit.megatron.bridge import export_hf_weights

    return {name: tensor.clone() for name, tensor in export_hf_weights(chunks, hf_config, ctx)}


def probe_logits(chunks, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [B, S, VOCAB_SIZE] of ``tokens`` inputs, on every rank."""
    from megatron.core import parallel_state

    from megatron_probes import pipeline_forward_logits

    bare = [getattr(chunk, "module", chunk) for chunk in chunks]  # DDP -> GPTModel
    logits = pipeline_forward_logits(bare, tokens[:, :-1])
    holder = [logits]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast_object_list(
            holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return holder[0]


def perturbed_hf_model(family: str, seed: int, num_layers: int = 4, **options):
    """A random tiny HF model (vocab 101: TP=2 pads it) with every parameter perturbed, so norms
    are not 1 and biases not 0 (a layout bug cannot hide behind a trivial init)."""
    from transformers import AutoModelForCausalLM

    from megacredit.models.tiny import tiny_config

    config = tiny_config(family, vocab_size=101, num_hidden_layers=num_layers, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def each_loaded_model(layouts: dict, hf_dirs: dict):
    """For each (TP, PP) layout in turn (Megatron re-initialised) and each saved HF model: yield
    ``(layout, model_key, ctx, hf_config, model)`` with the HF weights loaded. Run in ranks."""
    from transformers import AutoConfig

    from megacredit.megatron.bridge import load_hf_weights
    from megacredit.megatron.distributed import initialize
    from megacredit.megatron.model_provider import build_gpt_model

    for layout, (tp, pp) in layouts.items():
        ctx = initialize(tp, pp, seed=1)
        for model_key, hf_dir in hf_dirs.items():
            hf_config = AutoConfig.from_pretrained(hf_dir)
            model = build_gpt_model(hf_config, ctx)
            load_hf_weights([model], hf_dir, hf_config, ctx)
            yield layout, model_key, ctx, hf_config, model
def random_sample_sequences(generator: torch.Generator, vocab: int, without_signal: tuple[int, ...] = (),
                            response_lengths: tuple[int, ...] = (3, 4, 5, 6)) -> dict:
    """Rollout samples of random ids, one per response length: prompt (4), privileged context
    (3), one contrastive prompt (5), the response; ``without_signal`` lists samples with no
    teacher signal."""
    from megacredit.data.teacher_context import SampleSequences

    samples = {}
    for index, length in enumerate(response_lengths):
        response = torch.randint(3, vocab, (length,), generator=generator).tolist()
        prompt = torch.randint(3, vocab, (4,), generator=generator).tolist()
        privileged = torch.randint(3, vocab, (3,), generator=generator).tolist()
        other_prompt = torch.randint(3, vocab, (5,), generator=generator).tolist()
        samples[index] = SampleSequences(
            student_ids=prompt + response, teacher_ids=prompt + privileged + response,
            contrastive_ids=[other_prompt + privileged + response], response_length=len(response),
            has_teacher_signal=index not in without_signal, sibling_index=None, teacher_x_span=(0, 4),
            teacher_privileged_span=(4, 7))
    return samples


def four_sample_batch():
    """A ``RolloutBatch`` for :func:`random_sample_sequences`' four samples: two groups of two,
    rewards 1, 0, 0, 1 (the passes read the samples; the batch gives groups and rewards)."""
    from megacredit.trainer.rollout import RolloutBatch

    return RolloutBatch(records=[{}] * 4, group_ids=[0, 0, 1, 1], prompt_ids=[[]] * 4, response_ids=[[]] * 4,
                        response_texts=[""] * 4, finish_reasons=["stop"] * 4, rewards=[1.0, 0.0, 0.0, 1.0],
                        feedbacks=[""] * 4)


def model_shards(hf_config, state: dict, ctx, **build_options) -> list[torch.Tensor]:
    """This rank's parameter shards of the HF ``state``, in the order of a model built like the
    actor's (e.g. the tensors of a teacher that differs from the policy)."""
    from megacredit.megatron.bridge import load_hf_weights
    from megacredit.megatron.model_provider import build_gpt_model

    model = build_gpt_model(hf_config, ctx, **build_options)
    load_hf_weights([model], state, hf_config, ctx)
    return [param.detach() for param in model.parameters()]
