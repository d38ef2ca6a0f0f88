"""Packed sequences (THD, block-diagonal causal attention, RoPE restarting per sequence) give the
same outputs and gradients as running each sequence alone through the real Megatron GPTModel.
OLMo-3: three of its four layers attend in a sliding window of 4 tokens (the sequences are 3, 5
and 9 long), which the packed path applies itself and Megatron's unpacked attention through
``config.window_size``."""

import pytest
import torch

from megacredit.utils.spawn import run_distributed
from megacredit.data.packing import SequenceToPack, pack_sequences, split_per_sequence

pytestmark = pytest.mark.distributed


def _packed_vs_separate(rank, world_size, family, num_layers):
    from megacredit.megatron import distributed
    from megacredit.megatron.model_provider import build_gpt_model
    from megacredit.megatron.packed_attention import enable_packed_attention, packed_seq_params
    from megacredit.models.tiny import tiny_config
    from megatron_probes import causal_attention_mask

    ctx = distributed.initialize(1, 1, seed=3)
    model = build_gpt_model(tiny_config(family, vocab_size=97, num_hidden_layers=num_layers), ctx)
    assert enable_packed_attention(model) == num_layers
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (5, 9, 3)]
    micro_batch = pack_sequences([[SequenceToPack((i,), tuple(s), 2)] for i, s in enumerate(sequences)],
                                 token_budget=64, pad_to_multiple=8)[0]
    packed = model(micro_batch.tokens[None], micro_batch.position_ids[None], None,
                   packed_seq_params=packed_seq_params(micro_batch.cu_seqlens))[0]
    packed_scores = packed[micro_batch.prediction_index].gather(1, micro_batch.target_ids[:, None])
    packed_grads = torch.autograd.grad(packed_scores.sum(), list(model.parameters()))
    separate, separate_scores = [], []
    for tokens in sequences:
        ids = torch.tensor(tokens)[None]
        out = model(ids, torch.arange(len(tokens))[None], causal_attention_mask(len(tokens), ids.device))[0]
        separate.append(out)
        separate_scores.append(out[1:-1].gather(1, ids[0, 2:, None]))
    separate_grads = torch.autograd.grad(torch.cat(separate_scores).sum(), list(model.parameters()))
    per_sequence = split_per_sequence(packed[micro_batch.prediction_index], micro_batch)
    return (torch.cat(separate), packed[: sum(map(len, sequences))].detach(),
            [g.clone() for g in packed_grads], [g.clone() for g in separate_grads],
            {k: v.shape for k, v in per_sequence.items()}, micro_batch.cu_seqlens.tolist())


@pytest.mark.parametrize("family, num_layers", [("qwen3", 2), ("olmo3", 4)])
def test_packed_forward_and_gradients_equal_separate_sequences(family, num_layers):
    ((separate, packed, packed_grads, separate_grads, shapes, cu_seqlens),) = run_distributed(
        _packed_vs_separate, world_size=1, family=family, num_layers=num_layers)
    assert cu_seqlens == [0, 5, 14, 17, 24]  # three sequences and a padding block
    torch.testing.assert_close(packed, separate.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_grads, separate_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Response predictions per sequence: lengths 5, 9, 3 minus the 2-token context.
    assert {key: shape[0] for key, shape in shapes.items()} == {(0,): 3, (1,): 7, (2,): 1}
