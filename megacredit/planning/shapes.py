"""The shape of the policy model a config names, without loading it (for the memory planner).

From ``model.tiny`` for ``tiny``, from a local Hugging Face folder's ``config.json``, or from
:data:`KNOWN_SHAPES` for the builtin SmolLM2 and the hub ids of the paper-scale recipes (their
published ``config.json`` values, copied here so that planning needs no network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megacredit.config.parsing import ConfigError
from megacredit.config.schema import MegacreditConfig

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose layer the planner counts (OLMo-3's post-norms and whole-projection QK-norm,
Qwen3-MoE's experts: not yet)."""
SMOLLM2_VOCAB = 49152
"""The SmolLM2 tokenizer's vocabulary (the tiny model's default tokenizer)."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a dense GQA SwiGLU decoder depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qk_norm: bool = False
    qkv_bias: bool = False


KNOWN_SHAPES = {
    "smollm2-135m-instruct": ModelShape(576, 30, 9, 3, 64, 1536, SMOLLM2_VOCAB, tied=True),
    "Qwen/Qwen3-8B": ModelShape(4096, 36, 32, 8, 128, 12288, 151936, tied=False, qk_norm=True),
    "Qwen/Qwen3-32B": ModelShape(5120, 64, 64, 8, 128, 25600, 151936, tied=False, qk_norm=True),
}


def shape_from_hf_dict(d: dict) -> ModelShape:
    """A shape from a Hugging Face ``config.json`` (Llama, Qwen2, Qwen3 families)."""
    heads = int(d["num_attention_heads"])
    kind = d.get("model_type", "")
    if kind not in DENSE_FAMILIES or d.get("num_experts"):
        raise ConfigError(f"model.name_or_path: the planner counts the dense families {DENSE_FAMILIES} only, "
                          f"not {kind!r}{' with experts' if d.get('num_experts') else ''}; plan a dense model")
    return ModelShape(hidden=int(d["hidden_size"]), layers=int(d["num_hidden_layers"]), heads=heads,
                      kv_heads=int(d.get("num_key_value_heads") or heads),
                      head_dim=int(d.get("head_dim") or d["hidden_size"] // heads), ffn=int(d["intermediate_size"]),
                      vocab=int(d["vocab_size"]), tied=bool(d.get("tie_word_embeddings", False)),
                      qk_norm=kind == "qwen3", qkv_bias=kind == "qwen2" or bool(d.get("attention_bias", False)))


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
