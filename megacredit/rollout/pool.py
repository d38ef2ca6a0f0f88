"""Data-parallel generation: one step's prompts split across several engines, results gathered;
engines that die or hang are survived.

:class:`EnginePool` is itself a :class:`RolloutEngine`, so the trainer drives one engine or
many the same way. Its contract (docs/engines.md, docs/reliability.md):

* **Split.** The ``P`` prompts of a ``generate`` call are cut into contiguous chunks, one per
  engine, sizes differing by at most one, earlier engines taking the larger ones
  (:func:`contiguous_chunks`). Engine ``k`` gets prompts ``[start_k, end_k)`` with
  ``SamplingParams.seed_offset`` raised by ``start_k``, so an engine that seeds every request
  (vLLM, SGLang) samples prompt ``i`` with ``request_seed(seed, i)`` wherever it runs.
* **Gather.** Outputs are concatenated in prompt order, grouped by prompt (outputs
  ``[i * n, (i + 1) * n)`` answer prompt ``i``, ``prompt_index`` refers to the whole call):
  exactly the order one engine returns for the whole batch. With per-request seeds the gathered
  batch therefore equals one engine's, token for token.
* **Weights.** Every serving engine receives every bucket; the manifest is checked against every
  engine before anything is copied; the probe check scores each engine on its own (``engines``).
* **Faults.** A call that fails on an engine with :class:`EngineUnavailableError` (refused,
  reset, timed out: ``rollout.request_timeout_s``), or with any error while the engine fails its
  health check, is a fault: the engine leaves the pool, its chunk is split again over the engines
  left (same seeds, so the gathered batch is the one the healthy pool returns), and its server is
  restarted in the background when megacredit started it (``RolloutEngine.restart``). Errors a
  healthy engine answers with propagate: a fault is never a way to hide a bug. Every fault is
  logged (engine, what it was doing, cause) and kept for the step's metrics (:meth:`take_faults`);
  more than ``max_faults`` in the run, or no engine left, stop the run with one line (RunFault).
* **Rejoin.** Every weight update starts with a health check of every engine: a serving engine
  that fails it leaves; a departed one that answers again (restarted by megacredit or by whoever
  runs it) rejoins and receives that whole update, so it never generates with stale weights.

The engines are called from threads (one per engine), so remote servers generate in
parallel; in-process engines share this process's cores.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from megacredit.rollout.base import (
    EngineUnavailableError,
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
)
from megacredit.utils.errors import RunFault, one_line

logger = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class EngineFault:
    """One engine failure the pool survived."""

    engine: str
    """``engine K (url)``: its position in ``rollout.urls`` and its address."""
    during: str
    """What it was doing: generate, score, weight update, health check, ..."""
    cause: str
    """The error, one line."""

    def __str__(self) -> str:
        return f"{self.engine} failed during {self.during} ({self.cause})"


class EnginePool(RolloutEngine):
    """Several engines behind one RolloutEngine (see the module docstring)."""

    def __init__(self, engines: Sequence[RolloutEngine], max_faults: int = 10) -> None:
        """max_faults: faults survived over the pool's life before the run stops
        (``rollout.max_engine_faults``; 0 = stop at the first)."""
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        self.members = list(engines)
        self.max_faults = max_faults
        self.faults_total = 0
        self._serving = [True] * len(self.members)
        self._last_fault: dict[int, EngineFault] = {}
        self._faults: list[EngineFault] = []
        self._restarts: dict[int, threading.Thread] = {}
        self._manifest: Mapping[str, Sequence[int]] | None = None
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=len(self.members), thread_name_prefix="engine-pool")

    @property
    def reads_buckets_in_call(self) -> bool:  # type: ignore[override]
        return all(engine.reads_buckets_in_call for engine in self.members)

    # --------------------------------------------------------------------------- faults
    @property
    def engines(self) -> list[RolloutEngine]:
        """The engines serving now (one that failed is left out until it rejoins)."""
        return [engine for engine, serving in zip(self.members, self._serving) if serving]

    def fault_metrics(self) -> dict[str, float]:
        """Faults survived since the last call (this step's rollout and sync, a validation before
        it) and the engines serving now."""
        return {"rollout/engine_faults": float(len(self.take_faults())), "rollout/engines_serving": float(len(self.engines))}

    def take_faults(self) -> list[EngineFault]:
        with self._lock:
            faults, self._faults = self._faults, []
        return faults

    def _name(self, index: int) -> str:
        engine = self.members[index]
        return f"engine {index} ({getattr(engine, 'url', None) or type(engine).__name__})"

    def _fault_cause(self, index: int, error: BaseException) -> str | None:
        """The cause when ``error`` means the engine died or hangs, None for an error it answered."""
        if isinstance(error, EngineUnavailableError):
            return one_line(error)
        problem = self.members[index].health_problem()
        return None if problem is None else f"{one_line(error)}; health check: {problem}"

    def _drop(self, index: int, during: str, cause: str, moved: str) -> None:
        """Take engine ``index`` out of service, log and count the fault, start its restart."""
        with self._lock:
            if not self._serving[index]:
                return
            self._serving[index] = False
            fault = self._last_fault[index] = EngineFault(self._name(index), during, cause)
            self._faults.append(fault)
            self.faults_total += 1
        logger.warning("rollout %s; %s; %d engine(s) left; it rejoins when it answers its health check at a "
                       "weight update (restarted first when megacredit started it)", fault, moved, sum(self._serving))
        if self.faults_total > self.max_faults:
            raise RunFault(f"rollout engines failed {self.faults_total} times, more than rollout.max_engine_faults="
                           f"{self.max_faults} (the last: {fault}); fix the servers, then resume with "
                           f"checkpoint.resume=auto")
        self._start_restart(index)

    def _start_restart(self, index: int) -> None:
        engine, name = self.members[index], self._name(index)

        def restart() -> None:
            try:
                if engine.restart():
                    logger.warning("rollout %s was restarted; it rejoins at the next weight update", name)
            except Exception as error:  # noqa: BLE001 - a failed restart leaves the engine out
                logger.warning("rollout %s could not be restarted (%s)", name, one_line(error))

        thread = threading.Thread(target=restart, name=f"engine-restart-{index}", daemon=True)
        self._restarts[index] = thread
        thread.start()

    def _serving_indices(self, during: str) -> list[int]:
        """Indices of the serving engines; none left stops the run with one line."""
        serving = [index for index, alive in enumerate(self._serving) if alive]
        if not serving:
            causes = "; ".join(str(fault) for fault in self._last_fault.values())
            raise RunFault(f"no rollout engine is left for {during}: {causes}; restart the servers "
                           f"(rollout.urls), then resume with checkpoint.resume=auto")
        return serving

    def _result_or_fault(self, index: int, future: Future, during: str, moved: str) -> tuple[bool, Any]:
        """(True, result), or (False, None) after dropping the engine for a fault; other errors raise."""
        try:
            return True, future.result()
        except Exception as error:  # noqa: BLE001 - a fault, or re-raised
            cause = self._fault_cause(index, error)
            if cause is None:
                raise
            self._drop(index, during, cause, moved)
            return False, None

    # ----------------------------------------------------------------------- generation
    def _split(self, count: int, call: Callable[[RolloutEngine, int, int], list], during: str) -> list:
        """``call(engine, start, end)`` over contiguous chunks of ``range(count)`` across the serving
        engines; a chunk whose engine fails is split again over the engines left. Index order."""
        done: dict[int, list] = {}
        pending = [(0, count)]
        while pending:
            serving = self._serving_indices(during)
            jobs = [(index, start + a, start + b, self._threads.submit(call, self.members[index], start + a, start + b))
                    for start, end in pending
                    for index, (a, b) in zip(serving, contiguous_chunks(end - start, len(serving)))]
            pending = []
            for index, start, end, future in jobs:
                ok, result = self._result_or_fault(index, future, during,
                                                   f"its {end - start} item(s) are split over the engines left")
                if ok:
                    done[start] = result
                else:
                    pending.append((start, end))
        return [item for start in sorted(done) for item in done[start]]

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 *, progress: Callable[[int], None] | None = None) -> list[RolloutOutput]:
        def call(engine: RolloutEngine, start: int, end: int) -> list[RolloutOutput]:
            shifted = dataclasses.replace(params, seed_offset=params.seed_offset + start)
            outputs = engine.generate(prompt_token_ids[start:end], shifted, progress=progress)
            for output in outputs:
                output.prompt_index += start
            return outputs

        return self._split(len(prompt_token_ids), call, "generate")

    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self._split(len(sequences), lambda engine, start, end: engine.score_logprobs(sequences[start:end]),
                           "score")

    # --------------------------------------------------------------------------- weights
    def _on_serving(self, call: Callable[[RolloutEngine], Any], during: str) -> list[Any]:
        """``call`` on every serving engine in parallel; engines that fail leave (faults). Every
        call ends before an error is raised (an abort then finds no engine still loading)."""
        futures = [(index, self._threads.submit(call, self.members[index]))
                   for index in self._serving_indices(during)]
        wait([future for _, future in futures])
        results = [self._result_or_fault(index, future, during, "the others go on") for index, future in futures]
        self._serving_indices(during)
        return [result for ok, result in results if ok]

    def _check_health_and_rejoin(self) -> None:
        """Start of a weight update: serving engines that fail their health check leave;
        departed ones that answer again (and are not restarting) rejoin and get this update."""
        candidates = [index for index in range(len(self.members))
                      if not (index in self._restarts and self._restarts[index].is_alive())]
        problems = list(self._threads.map(lambda index: self.members[index].health_problem(), candidates))
        for index, problem in zip(candidates, problems):
            if self._serving[index] and problem is not None:
                self._drop(index, "health check", problem, "it gets no weights")
            elif not self._serving[index] and problem is None:
                try:
                    if self._manifest is not None:
                        self.members[index].check_weight_manifest(self._manifest)
                except EngineUnavailableError:
                    continue  # gone again: stays out
                self._serving[index] = True
                logger.warning("rollout %s answers again; it rejoins with this weight update", self._name(index))

    def check_weight_manifest(self, manifest: Mapping[str, Sequence[int]]) -> None:
        """Every serving engine checks ``manifest`` (a mismatch raises KeyError / ValueError)."""
        self._manifest = manifest
        self._on_serving(lambda engine: engine.check_weight_manifest(manifest), "weight update")

    def begin_weight_update(self) -> None:
        self._check_health_and_rejoin()
        self._on_serving(lambda engine: engine.begin_weight_update(), "weight update")

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        pairs = list(named_tensors)
        reports = self._on_serving(lambda engine: engine.load_weights(pairs), "weight update")
        return WeightLoadReport(num_tensors=reports[0].num_tensors, num_bytes=reports[0].num_bytes)

    def finish_weight_update(self) -> None:
        self._on_serving(lambda engine: engine.finish_weight_update(), "weight update")

    def abort_weight_update(self) -> None:
        """Every serving engine winds its update down; nothing raises over the update's error."""
        for index in [i for i, serving in enumerate(self._serving) if serving]:
            try:
                self.members[index].abort_weight_update()
            except Exception as error:  # noqa: BLE001 - the update's own error is the one raised
                logger.warning("rollout %s: abort of the weight update failed (%s)", self._name(index), one_line(error))

    def missing_weight_names(self, received: set[str]) -> list[str] | None:
        return self.engines[0].missing_weight_names(received)

    def read_weights(self) -> Mapping[str, torch.Tensor] | None:
        return self.engines[0].read_weights()

    # ----------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        self._on_serving(lambda engine: engine.sleep(), "sleep")

    def wake(self) -> None:
        self._on_serving(lambda engine: engine.wake(), "wake")

    def shutdown(self, restart_timeout: float = 900.0) -> None:
        """Wait for restarts in progress (their servers belong to whoever started them), then shut
        every engine down."""
        try:
            for thread in self._restarts.values():
                thread.join(restart_timeout)
            for engine in self.members:
                engine.shutdown()
        finally:
            self._threads.shutdown(wait=False)
