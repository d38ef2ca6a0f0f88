"""Shared pieces of the Megatron multi-process tests (run inside spawned ranks).

A tiny random Llama-like config, a fixed token batch, a DDP + Adam training step through
``megacredit.megatron.schedule.forward_backward`` and layout-independent probes (full-vocab
logits gathered over TP, broadcast from the last pipeline stage).
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 101
SEQ_LENGTH = 12
NUM_SEQUENCES = 4


def tiny_llama_config(num_layers: int = 2):
    """hidden 64, 4 heads, 2 KV groups, vocab 101 (not a multiple of 128*TP: padding is real)."""
    from megacredit.models.tiny import tiny_config

    return tiny_config("llama", vocab_size=VOCAB_SIZE, num_hidden_layers=num_layers, initializer_range=0.1)


def fixed_tokens(seed: int = 0, num_sequences: int = NUM_SEQUENCES) -> torch.Tensor:
    """[num_sequences, SEQ_LENGTH + 1] token ids (inputs plus the shifted label column)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (num_sequences, SEQ_LENGTH + 1), generator=generator)


def micro_batches(tokens: torch.Tensor, micro_batch_size: int, ignore_last: bool = True) -> list[dict]:
    """Split ``tokens`` into micro-batches of ``input_ids``/``labels``.

    With ``ignore_last`` the last label of every odd row is -100, so micro-batches hold
    different token counts and a per-micro-batch mean would be wrong (the global denominator
    matters).
    """
    input_ids, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    if ignore_last:
        labels[1::2, -3:] = -100
    return [
        {"input_ids": ids, "labels": lab}
        for ids, lab in zip(input_ids.split(micro_batch_size), labels.split(micro_batch_size))
    ]


def count_labels(batches: list[dict]) -> int:
    return int(sum(int((b["labels"] != -100).sum()) for b in batches))


def dp_shard(batches: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """Micro-batches of one data-parallel replica (round robin)."""
    return batches[dp_rank::dp_size]


def build_model(ctx, num_layers: int = 2):
    from megacredit.megatron.model_provider import build_gpt_model

    return [build_gpt_model(tiny_llama_config(num_layers), ctx)]


def train_step(chunks, optimizer, ctx, tokens: torch.Tensor, micro_batch_size: int = 1) -> float:
    """One full-batch step (micro-batches split over DP); returns the global loss."""
    from megacredit.megatron.optimizer import optimizer_step, zero_grads
    from megacredit.megatron.schedule import forward_backward, next_token_cross_entropy

    batches = micro_batches(tokens, micro_batch_size)
    loss_fn = next_token_cross_entropy(VOCAB_SIZE, count_labels(batches))
    zero_grads(chunks, optimizer)
    results = forward_backward(chunks, dp_shard(batches, ctx.dp_rank, ctx.dp_size), loss_fn)
    result = optimizer_step(optimizer)
    assert result.success, result
    return global_loss(results)


def global_loss(results: list[dict]) -> float:
    """Sum of the loss shares of this replica's micro-batches, summed over DP."""
    from megatron.core import parallel_state

    local = torch.tensor(sum(float(r["loss"]) for r in results), dtype=torch.float64)
    torch.distributed.all_reduce(local, group=parallel_state.get_data_parallel_group())
    return float(local)


def probe_logits(chunks, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [B, S, VOCAB_SIZE] of ``tokens`` inputs, on every rank."""
    from megatron.core import parallel_state

    from megacredit.megatron.model_provider import pipeline_forward_logits

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
def random_sample_sequences(generator: torch.Generator, vocab: int, without_signal: tuple[int, ...] = ()) -> dict:
    """Four rollout samples of random ids: prompt (4), privileged context (3), one contrastive
    prompt (5), responses of 3..6 tokens; ``without_signal`` lists samples with no teacher signal."""
    from megacredit.data.teacher_context import SampleSequences

    samples = {}
    for index in range(4):
        response = torch.randint(3, vocab, (3 + index,), generator=generator).tolist()
        prompt = torch.randint(3, vocab, (4,), generator=generator).tolist()
        privileged = torch.randint(3, vocab, (3,), generator=generator).tolist()
        other_prompt = torch.randint(3, vocab, (5,), generator=generator).tolist()
        samples[index] = SampleSequences(
            student_ids=prompt + response, teacher_ids=prompt + privileged + response,
            contrastive_ids=[other_prompt + privileged + response], response_length=len(response),
            has_teacher_signal=index not in without_signal, sibling_index=None, teacher_x_span=(0, 4),
            teacher_privileged_span=(4, 7))
    return samples
