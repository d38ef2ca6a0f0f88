"""Rollout engines: the interface (base), the embedded CPU engine, SGLang / vLLM adapters.

``from megacredit.rollout import EmbeddedRolloutEngine, SamplingParams`` is the usual entry
point; the engine classes are imported lazily so that importing the interface stays cheap.
"""

from megacredit.rollout.base import (
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
    iterate_buckets,
    rebucket,
)

_LAZY = {
    "EmbeddedRolloutEngine": "megacredit.rollout.embedded",
    "SGLangRolloutEngine": "megacredit.rollout.sglang",
    "VLLMRolloutEngine": "megacredit.rollout.vllm",
    "VLLMServerEngine": "megacredit.rollout.vllm_server",
    "EnginePool": "megacredit.rollout.pool",
}

__all__ = [
    "RolloutEngine", "RolloutOutput", "SamplingParams", "WeightLoadReport",
    "iterate_buckets", "rebucket", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megacredit.rollout' has no attribute {name!r}")
