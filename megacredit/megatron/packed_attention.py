"""Packed-sequence (THD) attention for Megatron-Core's local (non-Transformer-Engine) layer spec.

On GPU, Transformer Engine's attention takes ``PackedSeqParams(qkv_format="thd")`` natively.
Megatron's local ``DotProductAttention`` refuses them, so on CPU this subclass accepts them and
attends within each ``cu_seqlens`` block (block-diagonal causal attention). Megatron's attention module has already
applied RoPE per sequence (positions restart at every ``cu_seqlens`` boundary) and squeezed the
batch dimension away; this module restores it, so the arithmetic is exactly that of the parent
class on each sequence alone. Swap it into a layer spec with :func:`with_packed_attention`.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megacredit.megatron.cpu_compat import causal_attention_mask


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also accepts THD-packed sequences.

    Each packed sequence is attended on its own (a causal softmax over its block only), so the
    cost is sum_i len_i^2, not T^2 as a dense block-diagonal mask over the whole row would be.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention supports qkv_format='thd', got {packed_seq_params.qkv_format!r}")
        if query.dim() == 3:  # [t, heads, dim] -> [t, b=1, heads, dim]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            mask = causal_attention_mask(end - start, query.device)
            outputs.append(super().forward(query[start:end], key[start:end], value[start:end], mask,
                                           attn_mask_type, attention_bias))
        return torch.cat(outputs, dim=0)


def with_packed_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a local GPT layer spec whose core attention accepts packed sequences."""
    spec = copy.deepcopy(layer_spec)
    attention = spec.submodules.self_attention.submodules
    if attention.core_attention is not DotProductAttention:
        raise ValueError(
            f"with_packed_attention expects the local spec's DotProductAttention, found {attention.core_attention}; "
            "Transformer Engine specs support packed sequences natively"
        )
    attention.core_attention = PackedDotProductAttention
    return spec


def packed_seq_params(cu_seqlens: torch.Tensor):
    """Megatron ``PackedSeqParams`` (THD) for one packed row with block boundaries ``cu_seqlens``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def enable_packed_attention(model: torch.nn.Module) -> int:
    """Let an already built local-spec model take packed sequences; returns modules changed.

    Equivalent to building it from :func:`with_packed_attention`'s spec: the subclass adds no
    parameters or state, only the THD branch of ``forward``. Transformer Engine's attention is
    left alone (it supports THD natively).
    """
    changed = 0
    for module in model.modules():
        if type(module) is DotProductAttention:
            module.__class__ = PackedDotProductAttention
            changed += 1
    return changed
