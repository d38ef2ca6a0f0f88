"""Tiny random Hugging Face causal-LM configs (Llama, Qwen2, Qwen3, OLMo-3, Qwen3-MoE) for fast
CPU tests.

Built locally, never downloaded. ``initializer_range`` defaults to 0.2 (not HF's 0.02) so a
random model's next-token distributions are peaked enough (max prob ~0.2 at vocab 96) for
sampling and greedy tests to be meaningful rather than near-uniform.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "olmo3", "qwen3_moe")
TINY_SLIDING_WINDOW = 4
"""OLMo-3's window at tiny size: shorter than the test sequences, so that it masks something."""

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": dict(use_sliding_window=False),
    "qwen3": dict(use_sliding_window=False),
    # OLMo-3's own layer pattern (3 sliding-window layers, then one full-attention layer).
    "olmo3": dict(sliding_window=TINY_SLIDING_WINDOW),
    "qwen3_moe": dict(use_sliding_window=False, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, router_aux_loss_coef=0.001),
}
"""What each tiny family sets beyond the shared sizes (importable without transformers)."""


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A 2-layer, hidden-64, GQA (4 query / 2 KV heads) config of ``family``.

    family: "llama" (no biases), "qwen2" (QKV biases), "qwen3" (QK-norm, head_dim set explicitly),
    "olmo3" (post-norms, QK-norm over the whole projection, sliding window of
    ``TINY_SLIDING_WINDOW`` on 3 of every 4 layers), "qwen3_moe" (4 experts, top-2).
    overrides: any config field, e.g. ``vocab_size=128, tie_word_embeddings=True``.
    """
    from transformers import AutoConfig

    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"tiny_config: family must be one of {TINY_FAMILIES}, got {family!r}")
    fields: dict[str, Any] = dict(
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
    fields.update(FAMILY_DEFAULTS[family])
    fields.update(overrides)
    if family in ("qwen3", "qwen3_moe"):  # their configs default to head_dim 128: keep hidden / heads
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    if family == "olmo3" and "rope_parameters" not in overrides:
        # Olmo3Config takes rope_theta for its full-attention layers only (the sliding ones keep
        # 500000 then): both layer types get the same plain RoPE here unless the caller says.
        theta = fields.pop("rope_theta")
        fields["rope_parameters"] = {kind: {"rope_type": "default", "rope_theta": theta}
                                     for kind in ("sliding_attention", "full_attention")}
    return AutoConfig.for_model(family, **fields)
