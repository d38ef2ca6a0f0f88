"""Packed-sequence (THD) attention for Megatron-Core's local (non-Transformer-Engine) layer spec.

On GPU, Transformer Engine's attention takes ``PackedSeqParams(qkv_format="thd")`` natively.
Megatron's local ``DotProductAttention`` refuses them, so on CPU this subclass accepts them and
attends within each ``cu_seqlens`` block (block-diagonal causal attention), the blocks laid out
as a padded batch. Megatron's attention module has already
applied RoPE per sequence (positions restart at every ``cu_seqlens`` boundary) and squeezed the
batch dimension away; this module restores it, so the arithmetic is exactly that of the parent
class on each sequence alone. Swap it into a layer spec with :func:`with_packed_attention`.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec



def _blocks_as_batch(cu_seqlens: torch.Tensor, device: torch.device):
    """Index map from a packed row to a padded batch of its blocks: ``index`` [L, n] (packed
    position of block b's token i, clamped), ``valid`` [n, L] and the Megatron mask [n, 1, L, L]
    (True = masked: causal within the block, padding keys masked)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    longest = int(lengths.max())
    positions = torch.arange(longest, device=device)
    valid = positions[None, :] < lengths[:, None]
    index = (cu_seqlens[:-1].to(device=device, dtype=torch.long)[:, None] + positions[None, :])
    index = index.clamp(max=int(cu_seqlens[-1]) - 1).t()
    causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
    mask = ~(causal[None] & valid[:, None, :])
    return index, valid, mask[:, None]


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also accepts THD-packed sequences.

    The packed blocks are laid out as a padded batch (one row per sequence) and attended in one
    call with a causal + key-padding mask, so each sequence sees only its own causal past and
    the cost is n_blocks * longest^2 (not total^2 as a dense block-diagonal mask would be).
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention supports qkv_format='thd', got {packed_seq_params.qkv_format!r}")
        if query.dim() == 4:  # [t, 1, heads, dim] -> [t, heads, dim]
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        index, valid, mask = _blocks_as_batch(packed_seq_params.cu_seqlens_q, query.device)
        output = super().forward(query[index], key[index], value[index], mask, attn_mask_type, attention_bias)
        return output.transpose(0, 1)[valid]  # [n, L, h*d] -> packed [t, h*d]


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
