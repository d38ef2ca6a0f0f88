"""A torch implementation of the fused RoPE hook Megatron-Core takes from Transformer Engine.

Megatron's unfused rotary embedding (``megatron/core/models/common/embeddings/rope_utils.py``,
``_apply_rotary_pos_emb_bshd`` / ``_apply_rotary_pos_emb_thd``) recomputes ``cos`` and
``sin`` of the frequency table in every layer, separately for the queries and the keys, and
for packed (THD) rows first splits the row per sequence and concatenates the per-sequence
frequency slices again -- about 10 memory-bound passes per layer that a small model on a CPU
pays noticeably for (they were several per cent of a SmolLM2 training step). When
``config.apply_rope_fusion`` is set, Megatron instead calls the module globals
``fused_apply_rotary_pos_emb`` (sbhd) and ``fused_apply_rotary_pos_emb_thd``, which it imports
from Transformer Engine and leaves ``None`` without it.

:func:`install` fills those globals with the functions below when Transformer Engine is absent
(it never replaces TE's kernels). They compute the same values as the unfused path, bit for
bit: ``t * cos + rotate_half(t) * sin`` with ``cos``/``sin`` of the same frequency table,
cast to ``t``'s dtype as Megatron does, but computed once per (frequency table, packed row)
and shared by all layers and by queries and keys (a one-entry cache keyed on the identity of
those tensors, which Megatron's GPTModel computes once per forward). The sign of
``rotate_half`` is folded into a cached ``sin`` (``(-x) * s == x * (-s)`` exactly in IEEE
arithmetic). Only the non-interleaved layout (HF's rotate-half, what megacredit's model
provider builds) and context parallel size 1 are supported; anything else raises. Sequence
parallelism needs nothing here: queries and keys are rotated after the QKV projection has
gathered the whole packed row, so ``cu_seqlens`` positions are those of the row.
"""

from __future__ import annotations

import weakref

import torch

_CACHE: dict = {"key": None, "value": None}


def _cos_sin(freqs: torch.Tensor, cu_seqlens: torch.Tensor | None, dtype: torch.dtype):
    """(cos, signed sin) [T or s, 1, 1, d] in ``dtype``, cached for the last (freqs, cu_seqlens)."""
    key = _CACHE["key"]
    if (key is not None and key[0]() is freqs and key[2] == dtype
            and (key[1]() if key[1] is not None else None) is cu_seqlens):
        return _CACHE["value"]
    table = freqs if cu_seqlens is None else freqs[_packed_positions(cu_seqlens, freqs.device)]
    cos = torch.cos(table).to(dtype)
    sin = torch.sin(table)
    half = sin.shape[-1] // 2
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).to(dtype)
    _CACHE["key"] = (weakref.ref(freqs), None if cu_seqlens is None else weakref.ref(cu_seqlens), dtype)
    _CACHE["value"] = (cos, signed_sin)
    return cos, signed_sin


def _packed_positions(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Position of every packed token inside its own sequence: 0, 1, ... restarting at each block."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(int(cu[-1]), device=device) - starts


def _rotate(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    rot_dim = cos.shape[-1]
    rotary, passthrough = t[..., :rot_dim], t[..., rot_dim:]
    half = rot_dim // 2
    swapped = torch.cat((rotary[..., half:], rotary[..., :half]), dim=-1)
    out = rotary * cos + swapped * signed_sin
    return out if passthrough.shape[-1] == 0 else torch.cat((out, passthrough), dim=-1)


def rope_sbhd(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
              interleaved: bool = False) -> torch.Tensor:
    """RoPE of ``t`` [s, b, h, d] with frequencies ``freqs`` [s, 1, 1, d_rot] (Megatron's sbhd hook)."""
    if interleaved:
        raise ValueError("megacredit's RoPE kernel supports rotary_interleaved=False only")
    cos, signed_sin = _cos_sin(freqs, None, t.dtype)
    return _rotate(t, cos, signed_sin)


def rope_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, cp_size: int = 1,
             cp_rank: int = 0) -> torch.Tensor:
    """RoPE of a packed row ``t`` [T, h, d]: positions restart at every ``cu_seqlens`` boundary."""
    if cp_size != 1:
        raise ValueError("megacredit's RoPE kernel supports context_parallel_size=1 only")
    cos, signed_sin = _cos_sin(freqs, cu_seqlens, t.dtype)
    return _rotate(t, cos[:, 0], signed_sin[:, 0])  # [T, 1, 1, d] -> [T, 1, d] broadcasts over heads


def install() -> bool:
    """Fill Megatron's fused-RoPE hooks with this module's functions when Transformer Engine
    left them empty; returns True when ``apply_rope_fusion=True`` will use them."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None and rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb = rope_sbhd
        rope_utils.fused_apply_rotary_pos_emb_thd = rope_thd
    return rope_utils.fused_apply_rotary_pos_emb_thd is rope_thd
