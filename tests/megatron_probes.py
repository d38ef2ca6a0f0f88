"""Full-vocabulary logits of a Megatron GPTModel, for tests that compare them with transformers'.

Training never materialises logits (``megacredit.megatron.rl_passes`` computes top-K and
log-probs from hidden states through the chunked vocab-parallel head); these probes do, on small
inputs: a plain causal forward with an explicit mask (Megatron's default mask is built on
"cuda"), the TP all-gather of the vocab-parallel logits, the padding columns dropped.

Importable from every test folder: pytest puts tests/ on ``sys.path`` (the rootdir conftest.py)
and spawned ranks inherit it.
"""

from __future__ import annotations

from typing import Sequence

import torch


def causal_attention_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron-convention causal mask [1, 1, S, S]: True where attention is NOT allowed."""
    ones = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)[None, None]


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..S-1 for every row of ``input_ids`` [B, S]."""
    batch, seq_length = input_ids.shape
    return torch.arange(seq_length, device=input_ids.device).unsqueeze(0).expand(batch, seq_length)


def forward_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Run a full (PP=1) model on ``input_ids`` [B, S]; returns TP-local logits [B, S, V/tp]
    (this rank's slice of the padded vocabulary)."""
    if not (model.pre_process and model.post_process):
        raise ValueError("forward_logits needs a model holding every stage (PP=1); "
                         "use pipeline_forward_logits for PP>1")
    mask = causal_attention_mask(input_ids.shape[1], input_ids.device)
    return model(input_ids, position_ids_for(input_ids), mask)


def gather_vocab_logits(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """All-gather vocab-parallel logits [..., V/tp] over the TP group and drop the padding
    columns: returns [..., vocab_size]."""
    from megatron.core import tensor_parallel

    full = tensor_parallel.gather_from_tensor_model_parallel_region(local_logits)
    return full[..., :vocab_size]


def pipeline_forward_logits(model_chunks: Sequence[torch.nn.Module],
                            input_ids: torch.Tensor) -> torch.Tensor | None:
    """Forward-only run of ``input_ids`` [B, S] (the same on every rank) as one micro-batch
    through Megatron's pipeline schedule (any PP size, incl. 1). Returns full-vocabulary logits
    [B, S, V] (TP-gathered, padding removed) on the last pipeline stage and None on the others."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(model_chunks)
    batch, seq_length = input_ids.shape
    vocab_size = chunks[-1].megacredit_vocab_size
    mask = causal_attention_mask(seq_length, input_ids.device)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens, position_ids_for(tokens), mask)
        return output, lambda logits, non_loss_data=True: gather_vocab_logits(logits, vocab_size)

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([input_ids]),
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
            seq_length=seq_length, micro_batch_size=batch, forward_only=True, collect_non_loss_data=True,
        )
    if not chunks[-1].post_process:
        return None
    return torch.cat(list(outputs), dim=0)
