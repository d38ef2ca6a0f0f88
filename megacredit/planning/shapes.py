"""The shape of the policy model a config names, without loading it (for the memory planner).

From ``model.tiny`` for ``tiny``, from a local Hugging Face folder's ``config.json``, or from
:data:`KNOWN_SHAPES` for the builtin SmolLM2 and the hub ids of the recipes in examples/ (their
``config.json`` values, copied here so that planning needs no network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megacredit.config.parsing import ConfigError
from megacredit.config.schema import MegacreditConfig

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo3", "qwen3_moe")
"""Families whose layer the planner counts: GQA attention and SwiGLU MLPs, with Qwen2's QKV bias,
Qwen3's per-head QK-norm, OLMo-3's post-norms (as many weights as pre-norms) and whole-projection
QK-norm, Qwen3-MoE's routed experts (every layer a MoE layer, no shared expert)."""
SMOLLM2_VOCAB = 49152
"""The SmolLM2 tokenizer's vocabulary (the tiny model's default tokenizer)."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a GQA SwiGLU decoder depends on (dense, or mixture-of-experts when
    ``experts`` > 0)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qk_norm: str = "none"
    """none; per_head (Qwen3: one head_dim weight each for q and k, replicated over TP);
    projection (OLMo-3: weights over all heads, split over TP like the heads)."""
    qkv_bias: bool = False
    experts: int = 0
    """Routed experts of each layer's MoE MLP (0: a dense MLP of ``ffn``)."""
    experts_per_token: int = 0
    """The router's top-k."""
    expert_ffn: int = 0
    """Each expert's intermediate size (``moe_intermediate_size``)."""


KNOWN_SHAPES = {
    "smollm2-135m-instruct": ModelShape(576, 30, 9, 3, 64, 1536, SMOLLM2_VOCAB, tied=True),
    "Qwen/Qwen3-8B": ModelShape(4096, 36, 32, 8, 128, 12288, 151936, tied=False, qk_norm="per_head"),
    "Qwen/Qwen3-32B": ModelShape(5120, 64, 64, 8, 128, 25600, 151936, tied=False, qk_norm="per_head"),
    "Qwen/Qwen3-30B-A3B": ModelShape(2048, 48, 32, 4, 128, 6144, 151936, tied=False, qk_norm="per_head",
                                     experts=128, experts_per_token=8, expert_ffn=768),
    "allenai/Olmo-3-7B-Instruct": ModelShape(4096, 32, 32, 32, 128, 11008, 100278, tied=False,
                                             qk_norm="projection"),
}


def _moe_fields(d: dict) -> dict:
    """Qwen3-MoE's expert fields (``num_experts``, which transformers 5 writes as
    ``num_local_experts``); a ConfigError for the layouts megacredit does not build (dense layers
    among the MoE ones, shared experts)."""
    if d.get("mlp_only_layers") or int(d.get("decoder_sparse_step", 1)) != 1 or d.get("shared_expert_intermediate_size"):
        raise ConfigError("model.name_or_path: the planner counts Qwen3-MoE with every layer a MoE layer and no "
                          "shared expert (mlp_only_layers empty, decoder_sparse_step 1), as megacredit builds it")
    return dict(experts=int(d.get("num_experts") or d["num_local_experts"]),
                experts_per_token=int(d["num_experts_per_tok"]), expert_ffn=int(d["moe_intermediate_size"]))


def shape_from_hf_dict(d: dict) -> ModelShape:
    """A shape from a Hugging Face ``config.json`` of one of :data:`FAMILIES`."""
    heads = int(d["num_attention_heads"])
    kind = d.get("model_type", "")
    if kind not in FAMILIES:
        raise ConfigError(f"model.name_or_path: the planner counts the families {FAMILIES}, not {kind!r}")
    qk_norm = {"qwen3": "per_head", "qwen3_moe": "per_head", "olmo3": "projection"}.get(kind, "none")
    return ModelShape(hidden=int(d["hidden_size"]), layers=int(d["num_hidden_layers"]), heads=heads,
                      kv_heads=int(d.get("num_key_value_heads") or heads),
                      head_dim=int(d.get("head_dim") or d["hidden_size"] // heads), ffn=int(d["intermediate_size"]),
                      vocab=int(d["vocab_size"]), tied=bool(d.get("tie_word_embeddings", False)), qk_norm=qk_norm,
                      qkv_bias=kind == "qwen2" or bool(d.get("attention_bias", False)),
                      **(_moe_fields(d) if kind == "qwen3_moe" else {}))


def model_shape(cfg: MegacreditConfig) -> ModelShape:
    """The shape of ``cfg.model``; a ConfigError naming ``model.name_or_path`` when it is unknown."""
    name = cfg.model.name_or_path
    if name == "tiny":
        tiny = cfg.model.tiny
        if tiny.vocab_size is None and tiny.tokenizer != "smollm2-135m-instruct":
            raise ConfigError("model.tiny.vocab_size: the planner needs it when the tokenizer is not the builtin "
                              "SmolLM2 one; set model.tiny.vocab_size")
        from megacredit.models.tiny import tiny_config  # as trainer/builder.py builds it (Qwen3: head_dim 16)

        fields = tiny.to_hf_config_dict(SMOLLM2_VOCAB)
        return shape_from_hf_dict(tiny_config(fields.pop("model_type"), **fields).to_dict())
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    config_json = Path(name).expanduser() / "config.json"
    if config_json.is_file():
        return shape_from_hf_dict(json.loads(config_json.read_text()))
    raise ConfigError(f"model.name_or_path: the planner knows no shape for {name!r}; give a local Hugging Face "
                      f"folder with a config.json, or one of {sorted(KNOWN_SHAPES)}")
