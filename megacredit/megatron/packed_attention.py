"""Packed-sequence (THD) attention for Megatron-Core's local (non-Transformer-Engine) layer spec.

On GPU, Transformer Engine's attention takes ``PackedSeqParams(qkv_format="thd")`` natively.
Megatron's local ``DotProductAttention`` refuses them, so on CPU this subclass accepts them and
attends within each ``cu_seqlens`` block (block-diagonal causal attention). Megatron's attention
module has already applied RoPE per sequence (positions restart at every ``cu_seqlens``
boundary) and squeezed the batch dimension away. With sequence parallelism too the whole row
arrives here: the QKV projection all-gathers the sequence shards before its matmul
(megacredit/megatron/sequence_parallel.py).

How: the blocks are laid out as a padded batch [n_blocks, longest, heads, dim] with one
``index_select`` per tensor, attended with ``torch.nn.functional.scaled_dot_product_attention``
(``is_causal=True``, or the causal sliding-window mask of a windowed layer: the window Megatron's
``DotProductAttention`` set up from ``config.window_size``; grouped KV heads without repeating
them), and the valid rows are selected back into the packed row. No padding mask is needed:
a block's padding sits after its last token, and
under the causal mask a real query never sees a later position, so padded keys are never
attended by real queries; the padded queries' outputs are dropped (and get no gradient). The
cost is n_blocks * longest^2, not total^2 as a dense block-diagonal mask would be. The index
maps are built once per packed row and shared by all layers (cached on the
``PackedSeqParams`` object). Same arithmetic as Megatron's unfused attention on each sequence
alone (softmax(QK^T * softmax_scale) V), up to float rounding inside the fused kernel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec


@dataclass(frozen=True)
class BlockLayout:
    """Index maps between a packed row of T tokens and its blocks as a padded [n, L] batch."""

    num_blocks: int
    """n: blocks of ``cu_seqlens`` (sequences and the padding tail)."""
    longest: int
    """L: length of the longest block."""
    to_padded: torch.Tensor
    """[n * L] packed position of block b's token i at b * L + i (clamped past a block's end)."""
    to_packed: torch.Tensor
    """[T] padded position b * L + i of each packed token."""


def block_layout(cu_seqlens: torch.Tensor, device: torch.device) -> BlockLayout:
    """The :class:`BlockLayout` of a packed row with block boundaries ``cu_seqlens``."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    num_blocks, longest, total = lengths.numel(), int(lengths.max()), int(cu[-1])
    positions = torch.arange(longest, device=device)
    to_padded = (cu[:-1, None] + positions[None, :]).clamp(max=total - 1).reshape(-1)
    block = torch.repeat_interleave(torch.arange(num_blocks, device=device), lengths)
    to_packed = block * longest + torch.arange(total, device=device) - cu[:-1][block]
    return BlockLayout(num_blocks, longest, to_padded, to_packed)


def _cached_layout(packed_seq_params, device: torch.device) -> BlockLayout:
    layout = getattr(packed_seq_params, "megacredit_block_layout", None)
    if layout is None or layout.to_padded.device != device:
        layout = block_layout(packed_seq_params.cu_seqlens_q, device)
        packed_seq_params.megacredit_block_layout = layout  # one per packed row, shared by all layers
    return layout


def sliding_window_mask(window_size: tuple[int, int] | None, length: int, device) -> torch.Tensor | None:
    """[L, L] True where query i may attend key j under Megatron's ``window_size`` (left, right)
    on top of the causal mask: ``i - left <= j <= i`` (Megatron's ``get_sliding_window_causal_mask``
    in megatron/core/transformer/utils.py, with right = 0 for a causal model); None without one."""
    if window_size is None:
        return None
    left, right = window_size
    if right != 0:
        raise ValueError(f"packed attention supports causal sliding windows (right = 0), got window_size={window_size}")
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return allowed if left < 0 else allowed.triu(-left)


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also accepts THD-packed sequences (see the module docstring)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention supports qkv_format='thd', got {packed_seq_params.qkv_format!r}")
        if self.softmax_offset is not None or attention_bias is not None:
            raise ValueError("packed attention supports softmax_type='vanilla' without attention bias")
        if query.dim() == 4:  # [t, 1, heads, dim] -> [t, heads, dim]
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        layout = _cached_layout(packed_seq_params, query.device)
        n, length = layout.num_blocks, layout.longest

        def padded(x: torch.Tensor) -> torch.Tensor:  # [t, h, d] -> [n, h, L, d]
            return x.index_select(0, layout.to_padded).view(n, length, *x.shape[1:]).transpose(1, 2)

        dropout = self.attention_dropout.p if self.training else 0.0
        # apply_query_key_layer_scaling divides softmax_scale by the layer number and the
        # parent's softmax multiplies it back; the product is the scale of the scores.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        window = sliding_window_mask(self.scale_mask_softmax.window_size, length, query.device)
        out = F.scaled_dot_product_attention(
            padded(query), padded(key), padded(value), attn_mask=window, dropout_p=dropout,
            is_causal=window is None, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
        out = out.transpose(1, 2).reshape(n * length, -1)  # [n, h, L, d] -> [n * L, h * d]
        return out.index_select(0, layout.to_packed)  # packed [t, h * d]


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
