"""Tiny random Hugging Face causal-LM configs (Llama, Qwen2, Qwen3) for fast CPU tests.

Built locally, never downloaded. ``initializer_range`` defaults to 0.2 (not HF's 0.02) so a
random model's next-token distributions are peaked enough (max prob ~0.2 at vocab 96) for
sampling and greedy tests to be meaningful rather than near-uniform.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

TINY_FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A 2-layer, hidden-64, GQA (4 query / 2 KV heads) config of ``family``.

    family: "llama" (no biases), "qwen2" (QKV biases), "qwen3" (QK-norm, explicit head_dim).
    overrides: any config field, e.g. ``vocab_size=128, tie_word_embeddings=True``.
    """
    common: dict[str, Any] = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        config_class: type[PretrainedConfig] = LlamaConfig
    elif family == "qwen2":
        config_class = Qwen2Config
        common.update(use_sliding_window=False)
    elif family == "qwen3":
        config_class = Qwen3Config
        common.update(head_dim=16, use_sliding_window=False)
    else:
        raise ValueError(f"tiny_config: family must be one of {TINY_FAMILIES}, got {family!r}")
    common.update(overrides)
    return config_class(**common)
