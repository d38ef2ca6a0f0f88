"""One entry point for the benchmark loaders: ``load_benchmark(name, path, **options)``."""

from __future__ import annotations

from typing import Any

from megacredit.data.common import LoadedDataset
from megacredit.data.livecodebench import load_livecodebench
from megacredit.data.sciknoweval import load_sciknoweval
from megacredit.data.toolalpaca import load_toolalpaca

LOADERS = {
    "livecodebench": load_livecodebench,
    "sciknoweval": load_sciknoweval,
    "toolalpaca": load_toolalpaca,
}
"""Benchmark name -> loader(path, skip_invalid_rows=..., **options)."""

BENCHMARK_ENV = {"livecodebench": "code", "sciknoweval": "multiple_choice", "toolalpaca": "tool_call"}
"""Benchmark name -> the environment (megacredit.envs.make_env name) that scores its records."""


def load_benchmark(name: str, path: str, skip_invalid_rows: bool = False, **options: Any) -> LoadedDataset:
    """Load local file ``path`` of benchmark ``name`` into normalised records."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](path, skip_invalid_rows=skip_invalid_rows, **options)
