"""Data-parallel generation: one step's prompts split across several engines, results gathered.

:class:`EnginePool` is itself a :class:`RolloutEngine`, so the trainer drives one engine or
many the same way. Its contract (docs/engines.md):

* **Split.** The ``P`` prompts of a ``generate`` call are cut into contiguous chunks, one per
  engine, sizes differing by at most one, earlier engines taking the larger ones
  (:func:`contiguous_chunks`). Engine ``k`` gets prompts ``[start_k, end_k)`` with
  ``SamplingParams.seed_offset`` raised by ``start_k``, so an engine that seeds every request
  (vLLM, SGLang) samples prompt ``i`` with ``request_seed(seed, i)`` wherever it runs.
* **Gather.** Outputs are concatenated in engine order, i.e. back in prompt order, grouped by
  prompt (outputs ``[i * n, (i + 1) * n)`` answer prompt ``i``, ``prompt_index`` refers to
  the whole call): exactly the order one engine returns for the whole batch. With per-request
  seeds the gathered batch therefore equals one engine's, token for token.
* **Weights.** Every engine receives every bucket; the manifest is checked against every
  engine before anything is copied; the probe check scores each engine on its own
  (``engines``).

The engines are called from threads (one per engine), so remote servers generate in
parallel; in-process engines share this process's cores.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
)


def contiguous_chunks(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, end)`` ranges covering ``range(count)``, sizes differing by
    at most one (earlier ranges larger); empty ranges are dropped."""
    if parts < 1:
        raise ValueError(f"contiguous_chunks: parts must be >= 1, got {parts}")
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + base + (1 if part < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


class EnginePool(RolloutEngine):
    """Several engines behind one RolloutEngine (see the module docstring)."""

    def __init__(self, engines: Sequence[RolloutEngine]) -> None:
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        self.engines = list(engines)
        self._threads = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="engine-pool")

    def _on_all(self, call: Callable[[RolloutEngine], Any]) -> list[Any]:
        futures = [self._threads.submit(call, engine) for engine in self.engines]
        return [future.result() for future in futures]

    def _split(self, items: Sequence[Any], call: Callable[[RolloutEngine, int, int], list]) -> list:
        chunks = contiguous_chunks(len(items), len(self.engines))
        futures = [self._threads.submit(call, engine, start, end)
                   for engine, (start, end) in zip(self.engines, chunks)]
        return [item for future in futures for item in future.result()]

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 *, progress: Callable[[int], None] | None = None) -> list[RolloutOutput]:
        def call(engine: RolloutEngine, start: int, end: int) -> list[RolloutOutput]:
            shifted = dataclasses.replace(params, seed_offset=params.seed_offset + start)
            outputs = engine.generate(prompt_token_ids[start:end], shifted, progress=progress)
            for output in outputs:
                output.prompt_index += start
            return outputs

        return self._split(prompt_token_ids, call)

    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self._split(sequences, lambda engine, start, end: engine.score_logprobs(sequences[start:end]))

    # --------------------------------------------------------------------------- weights
    def check_weight_manifest(self, manifest: Mapping[str, Sequence[int]]) -> None:
        for engine in self.engines:
            engine.check_weight_manifest(manifest)

    def begin_weight_update(self) -> None:
        self._on_all(lambda engine: engine.begin_weight_update())

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        pairs = list(named_tensors)
        reports = self._on_all(lambda engine: engine.load_weights(pairs))
        return WeightLoadReport(num_tensors=reports[0].num_tensors, num_bytes=reports[0].num_bytes)

    def finish_weight_update(self) -> None:
        self._on_all(lambda engine: engine.finish_weight_update())

    def abort_weight_update(self) -> None:
        self._on_all(lambda engine: engine.abort_weight_update())

    def missing_weight_names(self, received: set[str]) -> list[str] | None:
        return self.engines[0].missing_weight_names(received)

    def read_weights(self) -> Mapping[str, torch.Tensor] | None:
        return self.engines[0].read_weights()

    # ----------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        self._on_all(lambda engine: engine.sleep())

    def wake(self) -> None:
        self._on_all(lambda engine: engine.wake())

    def shutdown(self) -> None:
        try:
            self._on_all(lambda engine: engine.shutdown())
        finally:
            self._threads.shutdown(wait=False)
