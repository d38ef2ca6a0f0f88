"""Shared pieces of the vLLM tests: skip without vllm, a tiny model vLLM's CPU kernels accept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from make_deps import needs

needs_vllm = needs("vllm", importlib.util.find_spec("vllm") is not None)

# vLLM's CPU attention supports head_dim 64 (not the default tiny model's 16).
TINY_VLLM = {"model.tiny.hidden_size": 128, "model.tiny.num_attention_heads": 2,
             "model.tiny.num_key_value_heads": 1}


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 128, head_dim 64, tied embeddings) with SmolLM2's
    tokenizer, saved as an HF folder both vLLM and the trainer load."""
    import torch
    from transformers import AutoModelForCausalLM

    from megacredit.models.tiny import tiny_config
    from megacredit.trainer.builder import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct", "~/.cache/megacredit")
    config = tiny_config("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
