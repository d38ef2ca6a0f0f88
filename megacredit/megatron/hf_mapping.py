"""The Hugging Face <-> Megatron-Core parameter mapping (names and tensor layouts), no I/O.

One :class:`ParamMapping` per Megatron parameter says which HF tensors it is made of and how
they are laid out on each tensor-parallel (TP) rank:

- ``replicated``: RMSNorm weights (every rank holds the whole tensor).
- ``column``: output rows split in TP chunks (dim 0).
- ``row``: input columns split in TP chunks (dim 1): ``linear_proj`` (o_proj), ``linear_fc2``.
- ``vocab``: embedding / output layer rows, zero-padded to the padded vocab, then split on dim 0.
- ``qkv``: q/k/v fused per query group: ``[ng, (nh/ng) * hd (q) + hd (k) + hd (v), hidden]``
  (Megatron's ``SelfAttention.get_query_key_value_tensors`` layout); TP ranks hold whole
  groups, i.e. a contiguous chunk of dim 0. Biases (Qwen2) use the same layout without the
  hidden dim.
- ``gated``: SwiGLU ``linear_fc1`` = ``[gate; up]`` per rank: rank r holds
  ``[gate_r; up_r]`` (each of gate/up split on dim 0 first).
- ``expert_gated`` / ``expert``: an MoE expert's ``linear_fc1`` (``[gate; up]``) / ``linear_fc2``,
  whole on the expert-parallel rank that holds the expert (experts are not split over TP:
  expert_tensor_parallel_size is 1, megacredit/megatron/moe.py). Megatron names carry the GLOBAL
  expert index (``bridge_load.global_named_parameters`` converts the local one).

The layer table depends on the family (``model_type``): OLMo-3 has no pre-norms, post-norms at the
end of ``linear_proj`` / ``linear_fc2`` and TP-sharded whole-projection QK-norms
(megacredit/megatron/olmo3.py); Qwen3-MoE has a router and experts in checkpoint naming
(``mlp.experts.{e}.gate_proj.weight``; transformers 5 fuses them in memory only).

Megatron names are the local (non-Transformer-Engine) spec's, checked by printing a built
model's state dict. With the TE spec the layer norms are fused into the next linear and named
``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``; those
aliases are written from Megatron-Core's source (gpt_layer_specs.py, ``sharded_state_dict_keys_
map``) and are UNVERIFIED here (TE cannot be built on this CPU machine).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from megacredit.megatron.model_provider import head_dim_of, num_kv_heads_of

LAYER_PREFIX = "decoder.layers."
HF_LAYER_PREFIX = "model.layers."
EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"

LAYOUTS = ("replicated", "column", "row", "vocab", "qkv", "gated", "expert_gated", "expert")
EXPERT_LAYOUTS = ("expert_gated", "expert")


@dataclass(frozen=True)
class ParamMapping:
    """How one Megatron parameter is made of HF tensors."""

    megatron_name: str
    """Global Megatron name, e.g. ``decoder.layers.3.self_attention.linear_qkv.weight``."""
    hf_names: tuple[str, ...]
    """HF tensor names it is built from, in fusion order (q, k, v / gate, up)."""
    layout: str
    """One of LAYOUTS: how the tensor is fused and split over TP ranks."""


@dataclass(frozen=True)
class AttentionShape:
    """Head geometry needed to fuse / split q, k, v."""

    num_heads: int
    """Query heads (num_attention_heads)."""
    num_query_groups: int
    """Key/value heads (num_key_value_heads)."""
    head_dim: int
    """Per-head width (kv_channels)."""

    @classmethod
    def from_hf(cls, hf_config: Any) -> "AttentionShape":
        return cls(hf_config.num_attention_heads, num_kv_heads_of(hf_config), head_dim_of(hf_config))


# Layer-local Megatron suffix -> (HF suffixes under "model.layers.{i}.", layout).
_LAYER_TABLE: dict[str, tuple[tuple[str, ...], str]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "replicated"),  # TE
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_qkv.bias": (
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "replicated"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "replicated"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "row"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "replicated"),  # TE
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gated"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "row"),
}


_PRE_NORMS = ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", "pre_mlp_layernorm.weight",
              "mlp.linear_fc1.layer_norm_weight")
_FAMILY_LAYER_TABLES: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "olmo3": {
        **{suffix: entry for suffix, entry in _LAYER_TABLE.items() if suffix not in _PRE_NORMS},
        "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "column"),
        "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "column"),
        "self_attention.linear_proj.post_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
        "mlp.linear_fc2.post_layernorm.weight": (("post_feedforward_layernorm.weight",), "replicated"),
    },
    "qwen3_moe": {**_LAYER_TABLE, "mlp.router.weight": (("mlp.gate.weight",), "replicated")},
}
# Expert parameters of Megatron's SequentialMLP (megatron/core/transformer/moe/experts.py), with
# the global expert index.
EXPERT_PREFIX = "mlp.experts.local_experts."
_EXPERT_PATTERNS = (
    (re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc1\.weight"), ("gate_proj", "up_proj"), "expert_gated"),
    (re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc2\.weight"), ("down_proj",), "expert"),
)


def _layer_mapping(suffix: str, model_type: str) -> tuple[tuple[str, ...], str] | None:
    """(HF suffixes under "model.layers.{i}.", layout) of a layer-local Megatron suffix."""
    table = _FAMILY_LAYER_TABLES.get(model_type, _LAYER_TABLE)
    if suffix in table:
        return table[suffix]
    if model_type == "qwen3_moe":
        for pattern, projections, layout in _EXPERT_PATTERNS:
            match = pattern.fullmatch(suffix)
            if match:
                return tuple(f"mlp.experts.{int(match.group(1))}.{p}.weight" for p in projections), layout
    return None


def mapping_for(megatron_name: str, tied_embeddings: bool, model_type: str = "llama") -> ParamMapping:
    """The mapping of one global Megatron parameter name of a ``model_type`` model (raises
    KeyError naming it if unknown).

    With tied embeddings the (last-stage copy of the) output layer is built from the HF input
    embedding, since HF checkpoints then carry no ``lm_head.weight``.
    """
    if megatron_name == EMBEDDING:
        return ParamMapping(megatron_name, (HF_EMBEDDING,), "vocab")
    if megatron_name == OUTPUT_LAYER:
        return ParamMapping(megatron_name, (HF_EMBEDDING if tied_embeddings else HF_LM_HEAD,), "vocab")
    if megatron_name == FINAL_NORM:
        return ParamMapping(megatron_name, ("model.norm.weight",), "replicated")
    if megatron_name.startswith(LAYER_PREFIX):
        layer_index, _, suffix = megatron_name[len(LAYER_PREFIX):].partition(".")
        entry = _layer_mapping(suffix, model_type)
        if entry is not None:
            hf_suffixes, layout = entry
            prefix = f"{HF_LAYER_PREFIX}{int(layer_index)}."
            return ParamMapping(megatron_name, tuple(prefix + s for s in hf_suffixes), layout)
    raise KeyError(
        f"no Hugging Face mapping for Megatron parameter {megatron_name!r} of a {model_type} model; "
        f"megacredit's bridge covers Llama/Qwen2/Qwen3, OLMo-3 and Qwen3-MoE layers "
        f"(see megacredit/megatron/hf_mapping.py)"
    )


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """[q; k; v] (HF, head-major) -> Megatron's per-query-group interleaved fused tensor."""
    groups, per_group, head_dim = shape.num_query_groups, shape.num_heads // shape.num_query_groups, shape.head_dim
    rest = q.shape[1:]
    fused = torch.cat(
        [
            q.reshape(groups, per_group * head_dim, *rest),
            k.reshape(groups, head_dim, *rest),
            v.reshape(groups, head_dim, *rest),
        ],
        dim=1,
    )
    return fused.reshape(groups * (per_group + 2) * head_dim, *rest)


def split_qkv(fused: torch.Tensor, shape: AttentionShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: Megatron fused (full, TP-gathered) -> HF q, k, v (one copy
    each when the query groups interleave, views of ``fused`` for a single group)."""
    groups, per_group, head_dim = shape.num_query_groups, shape.num_heads // shape.num_query_groups, shape.head_dim
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(groups * per_group * head_dim, *rest),
        k.reshape(groups * head_dim, *rest),
        v.reshape(groups * head_dim, *rest),
    )


def shard_for_rank(
    mapping: ParamMapping,
    hf_tensors: list[torch.Tensor],
    tp_rank: int,
    tp_size: int,
    padded_vocab: int,
    shape: AttentionShape,
) -> torch.Tensor:
    """The slice of a Megatron parameter that TP rank ``tp_rank`` holds, from its HF tensors."""
    layout = mapping.layout
    if layout == "replicated":
        return hf_tensors[0]
    if layout == "column":
        return hf_tensors[0].chunk(tp_size, dim=0)[tp_rank]
    if layout == "row":
        return hf_tensors[0].chunk(tp_size, dim=1)[tp_rank]
    if layout == "vocab":
        table = hf_tensors[0]
        if table.shape[0] > padded_vocab:
            raise ValueError(f"{mapping.hf_names[0]} has {table.shape[0]} rows > padded vocab {padded_vocab}")
        padded = table.new_zeros(padded_vocab, *table.shape[1:])
        padded[: table.shape[0]] = table
        return padded.chunk(tp_size, dim=0)[tp_rank]
    if layout == "qkv":
        return fuse_qkv(*hf_tensors, shape).chunk(tp_size, dim=0)[tp_rank]
    if layout == "gated":
        return torch.cat([t.chunk(tp_size, dim=0)[tp_rank] for t in hf_tensors], dim=0)
    if layout in EXPERT_LAYOUTS:  # whole on its expert-parallel rank
        return torch.cat(hf_tensors, dim=0) if len(hf_tensors) > 1 else hf_tensors[0]
    raise ValueError(f"unknown layout {layout!r} for {mapping.megatron_name}")


def unshard(
    mapping: ParamMapping,
    rank_shards: list[torch.Tensor],
    vocab_size: int,
    shape: AttentionShape,
) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`shard_for_rank`: the TP shards (ordered by rank) -> [(hf_name, tensor)].

    With one shard (no tensor parallelism) the HF tensors are views of it, except q/k/v when
    several query groups interleave (one copy each, :func:`split_qkv`); with several shards the
    concatenation is the copy."""
    layout, names = mapping.layout, mapping.hf_names

    def cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    if layout == "replicated":
        return [(names[0], rank_shards[0])]
    if layout == "column":
        return [(names[0], cat(rank_shards, 0))]
    if layout == "row":
        return [(names[0], cat(rank_shards, 1))]
    if layout == "vocab":
        return [(names[0], cat(rank_shards, 0)[:vocab_size])]
    if layout == "qkv":
        return list(zip(names, split_qkv(cat(rank_shards, 0), shape)))
    if layout == "gated":
        halves = [shard.chunk(2, dim=0) for shard in rank_shards]
        return [(names[0], cat([h[0] for h in halves], 0)), (names[1], cat([h[1] for h in halves], 0))]
    if layout in EXPERT_LAYOUTS:  # one shard: the whole expert tensor
        (whole,) = rank_shards
        return list(zip(names, whole.chunk(len(names), dim=0))) if len(names) > 1 else [(names[0], whole)]
    raise ValueError(f"unknown layout {layout!r} for {mapping.megatron_name}")
