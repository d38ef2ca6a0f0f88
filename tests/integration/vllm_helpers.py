"""Shared pieces of the vLLM tests: skip without vllm, a tiny model vLLM's CPU kernels accept,
servers started for a test module and stopped by PID."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path

from make_deps import needs
from process_helpers import running_servers

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


SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--seed", "0"]
"""vLLM server flags of the tests: float32 on CPU, no compilation, a fixed seed."""
PROMPTS = [[1, 504, 3458, 282], [1, 33, 44], [1, 7, 8, 9, 10], [1, 600], [1, 42, 43], [1, 99, 98, 97]]
"""Token-id prompts of different lengths."""


def server_fixtures(name: str, count: int = 2):
    """Module fixtures ``(model_dir, servers)``: a tiny model folder (:func:`write_tiny_model`) and
    ``count`` servers of it (:func:`vllm_servers`); assign them to those names in a test module."""
    import pytest

    @pytest.fixture(scope="module")
    def model_dir(tmp_path_factory):
        return write_tiny_model(tmp_path_factory.mktemp(name) / "model")

    @pytest.fixture(scope="module")
    def servers(model_dir, tmp_path_factory):
        with vllm_servers(model_dir, tmp_path_factory.mktemp(f"{name}_logs"), count) as started:
            yield started

    return model_dir, servers


@contextmanager
def vllm_servers(model_dir: Path, log_dir: Path, count: int = 2):
    """``count`` vLLM servers of ``model_dir`` on free ports, started in parallel; every one is
    stopped by its PID afterwards (also when a start failed)."""
    from megacredit.rollout.vllm_server import VLLMServer

    with running_servers([VLLMServer(model_dir, log_path=log_dir / f"server{i}.log", extra_args=SERVER_ARGS)
                          for i in range(count)]) as servers:
        yield servers
