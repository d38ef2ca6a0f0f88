"""SGLang behind megacredit's RolloutEngine: request bodies, output parsing, colocated engine.

VERIFIED ON CPU with SGLang 0.5.23 (its own Python engine, ``device="cpu"``, torch-native
attention; tests/sglang_cpu/): generation with the sampled tokens' log-probs, probe scoring,
checked weight updates from the HF-named bucket stream inside SGLang's update session, a
refused update leaving the previous weights, the sync check, whole training runs. UNVERIFIED
(GPU only, no GPU here): the CUDA build, CUDA-IPC handles (a CPU bucket travels through shared
memory instead), ``release_memory_occupation`` / ``resume_memory_occupation`` (need
``torch_memory_saver`` and CUDA), engine tensor parallelism > 1 inside a training job. See
docs/engines.md. The remote (HTTP) engine is in ``megacredit/rollout/sglang_server.py``.

Every SGLang call, as found in SGLang 0.5.23's source (``python/sglang/srt/``):

* ``entrypoints/engine.py``: ``Engine(**server_args)``; ``Engine.generate(input_ids=...,
  sampling_params=..., return_logprob=..., logprob_start_len=...)``;
  ``Engine.begin_weight_update()`` / ``Engine.end_weight_update()`` (since 0.5.21; absent in
  0.5.20); ``Engine.update_weights_from_tensor(named_tensors, load_format=None,
  flush_cache=True)``, which passes ``load_format="flattened_bucket"`` payloads through as one
  pre-serialized payload per TP rank (``Engine._serialize_tensors_per_rank``);
  ``Engine.flush_cache()``; ``Engine.release_memory_occupation()`` /
  ``resume_memory_occupation()``; ``Engine.shutdown()``.
* ``managers/scheduler_components/weight_updater.py``: ``SchedulerWeightUpdaterManager``
  answers ``update_weights_from_tensor`` outside a session with ``(False, "... must run between
  begin_weight_update() and end_weight_update()")`` and a second ``begin_weight_update`` with
  ``(False, "a weight-update session is already open ...")``; ``end_weight_update`` re-processes
  the loaded weights (``DefaultModelLoader.postprocess_weights``).
* ``model_executor/model_runner_components/weight_updater.py``: ``WeightUpdater.
  update_weights_from_tensor`` -> ``_update_weights_from_flattened_bucket`` rebuilds the tensors
  (``weight_sync/tensor_bucket.py``: ``FlattenedTensorBucket`` / ``FlattenedTensorMetadata``,
  the layout of :mod:`megacredit.rollout.flat_buckets`) and calls ``model.load_weights``, which
  SKIPS unknown names with a log line (``models/llama.py``) and, for a wrong shape, raises an
  AssertionError that this path does not catch: the scheduler process dies. So megacredit checks
  every name and shape against the checkpoint's manifest before anything is sent.
* ``utils/common.py``: ``MultiprocessingSerializer``; ``utils/patch_torch.py``:
  ``monkey_patch_torch_reductions`` (CUDA-IPC device ids; it breaks pickling CPU tensors, so it
  is applied to CUDA buckets only).
* ``sampling/sampling_params.py``: ``max_new_tokens`` (>= 0), ``stop_token_ids``,
  ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (-1 = off), ``ignore_eos``,
  ``sampling_seed``; ``sampling/sampling_batch_info.py`` uses ``sampling_seed`` only with
  ``enable_deterministic_inference``, which 0.5.23 refuses with the CPU's torch-native attention.
* ``managers/tokenizer_manager.py``: ``detokenize_logprob_tokens`` gives
  ``meta_info["output_token_logprobs"]`` / ``["input_token_logprobs"]`` as
  ``(logprob, token_id, text)`` triples; ``meta_info["finish_reason"]["type"]`` is "stop",
  "length" or "abort" (``managers/schedule_batch.py`` ``FINISH_*.to_json``).
* ``Req._check_token_based_finish`` (``managers/schedule_batch.py``): ``ignore_eos`` disables
  every stop token, and ``stop_token_ids`` are checked IN ADDITION to the model's EOS ids.
* ``layers/sampler.py`` (``Sampler.forward``): sampled-token log-probs are ``log(softmax(logits / T))``
  unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set, which makes them come from the logits
  before temperature.

Semantics that differ from the embedded engine (documented in docs/engines.md):

* ``SamplingParams.stop_token_ids`` adds stop tokens to the model's EOS instead of replacing
  them; ``()`` (never stop) maps to ``ignore_eos``.
* Seeds go per request as ``sampling_seed``: sample j of prompt i of the step's whole batch
  gets ``request_seed(seed, (seed_offset + i) * n + j)``, so splitting the batch over engines
  does not change any request's seed; SGLang honours them only with
  ``enable_deterministic_inference`` (not available on CPU; see above).
* Log-probs: megacredit's contract is the sampled distribution, ``log_softmax(logits / T)`` at
  the rollout temperature (as verl's actor scores it). SGLang returns that by default; an
  environment that sets ``SGLANG_RETURN_ORIGINAL_LOGPROB`` to true is refused (it would return
  temperature-1 log-probs). The weight-sync probe scores at temperature 1, where both agree.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
    WeightManifest,
    WeightSyncError,
    bucket_bytes,
    request_seed,
)
from megacredit.rollout.checkpoint_manifest import checkpoint_manifest
from megacredit.rollout.flat_buckets import flatten_tensors, split_by_dtype

_INSTALL_HINT = (
    "the SGLang engine needs the `sglang` package: `pip install 'megacredit[sglang]'` in an "
    "environment whose torch SGLang accepts (see docs/engines.md: its own environment, or a "
    "constraints file in a container), or use rollout.engine=embedded or rollout.engine=vllm."
)
# How megacredit starts SGLang where CUDA is absent (SGLang's own CPU engine; what ran here):
# SGLANG_USE_CPU_ENGINE=1 selects its CPU code paths at import, torch-native attention and
# sampling need no compiled kernels, and a small KV pool (the default sizes it from free RAM).
CPU_ENV_DEFAULTS = {"SGLANG_USE_CPU_ENGINE": "1"}
CPU_SERVER_ARGS = {
    "device": "cpu", "attention_backend": "torch_native", "sampling_backend": "pytorch",
    "disable_cuda_graph": True, "disable_overlap_schedule": True, "max_total_tokens": 4096,
    "skip_server_warmup": True,
}
FLATTENED = "flattened_bucket"
logger = logging.getLogger(__name__)


def sglang_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment an SGLang engine starts with: ``environ`` plus, where CUDA is absent, the
    CPU defaults above (settings already present win). Refuses
    ``SGLANG_RETURN_ORIGINAL_LOGPROB`` set to true (temperature-1 log-probs; see above)."""
    from megacredit.rollout.server_process import engine_environment  # noqa: PLC0415

    env = engine_environment(CPU_ENV_DEFAULTS, environ)
    if env.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ValueError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would return log-probs at temperature 1, "
                         "not of the distribution it samples (rollout.temperature); unset it")
    return env


def server_args_with_defaults(server_args: Mapping[str, Any]) -> dict[str, Any]:
    """``server_args`` plus, where CUDA is absent, :data:`CPU_SERVER_ARGS` (given ones win)."""
    import torch  # noqa: PLC0415

    return dict(server_args) if torch.cuda.is_available() else {**CPU_SERVER_ARGS, **server_args}


def import_sglang() -> Any:
    """Import sglang lazily, with an actionable message when it is missing."""
    try:
        import sglang  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return sglang


# ------------------------------------------------------------------------------ requests
def sampling_params_dict(params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
    """One request's SGLang ``sampling_params`` (``n`` is expanded into rows by the caller)."""
    sampling: dict[str, Any] = {
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k),
        "max_new_tokens": int(params.max_new_tokens),
    }
    if params.stop_token_ids is not None:
        if params.stop_token_ids:
            sampling["stop_token_ids"] = list(params.stop_token_ids)
        else:
            sampling["ignore_eos"] = True
    if seed is not None:
        sampling["sampling_seed"] = int(seed)
    return sampling


def generate_request(prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> dict[str, Any]:
    """The body of one batched ``/generate`` call (also ``Engine.generate``'s keyword
    arguments): ``params.n`` rows per prompt, prompt by prompt, one seed per row."""
    input_ids, sampling = [], []
    for i, prompt in enumerate(prompt_token_ids):
        for j in range(params.n):
            row = (params.seed_offset + i) * params.n + j  # this sample's index in the whole batch
            input_ids.append([int(t) for t in prompt])
            sampling.append(sampling_params_dict(params, None if params.seed is None else request_seed(params.seed, row)))
    return {"input_ids": input_ids, "sampling_params": sampling, "return_logprob": True}


def parse_generate_results(
    results: Sequence[dict[str, Any]], prompt_token_ids: Sequence[Sequence[int]], n: int
) -> list[RolloutOutput]:
    """SGLang's batched results (one dict per row, in request order) -> RolloutOutputs."""
    if len(results) != len(prompt_token_ids) * n:
        raise RuntimeError(f"SGLang returned {len(results)} results for {len(prompt_token_ids) * n} requests")
    outputs = []
    for row, result in enumerate(results):
        prompt_index = row // n
        meta = result["meta_info"]
        finish = (meta.get("finish_reason") or {}).get("type")
        if finish not in ("stop", "length"):
            raise RuntimeError(
                f"SGLang request {row} (prompt {prompt_index}) ended with finish_reason="
                f"{meta.get('finish_reason')!r}; was generation paused or aborted during a weight update?"
            )
        triples = meta["output_token_logprobs"]
        token_ids = [int(t[1]) for t in triples]
        if "output_ids" in result and list(result["output_ids"]) != token_ids:
            raise RuntimeError(f"SGLang request {row}: output_ids disagree with output_token_logprobs")
        outputs.append(RolloutOutput(
            prompt_index=prompt_index, prompt_ids=[int(t) for t in prompt_token_ids[prompt_index]],
            token_ids=token_ids, logprobs=[float(t[0]) for t in triples], finish_reason=finish,
        ))
    return outputs


def score_request(sequences: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Body of a scoring call: prompt log-probs from position 0, nothing generated, T = 1."""
    if not sequences or any(len(s) < 2 for s in sequences):
        raise ValueError("score_logprobs: give a non-empty list of sequences of >= 2 tokens")
    return {
        "input_ids": [[int(t) for t in s] for s in sequences],
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "top_p": 1.0, "top_k": -1},
        "return_logprob": True,
        "logprob_start_len": 0,
    }


def parse_score_results(results: Sequence[dict[str, Any]], sequences: Sequence[Sequence[int]]) -> list[list[float]]:
    """``input_token_logprobs`` of each sequence without its first entry (SGLang gives None
    for the first token): log pi(s[t] | s[:t]) for t >= 1."""
    scores = []
    for index, (result, sequence) in enumerate(zip(results, sequences, strict=True)):
        triples = result["meta_info"]["input_token_logprobs"]
        if len(triples) != len(sequence) or [int(t[1]) for t in triples] != [int(t) for t in sequence]:
            raise RuntimeError(
                f"SGLang scored sequence {index} as {len(triples)} tokens that are not the "
                f"{len(sequence)} it was given (logprob_start_len=0 not honoured?)"
            )
        scores.append([float(t[0]) for t in triples[1:]])
    return scores


# --------------------------------------------------------------------------- weight sync
def _sglang_flat_metadata_class() -> Any:
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata  # noqa: PLC0415
    except ImportError:  # older SGLang kept it in the model runner
        from sglang.srt.model_executor.model_runner import FlattenedTensorMetadata  # noqa: PLC0415
    return FlattenedTensorMetadata


def _patch_torch_reductions() -> None:
    """SGLang's fix of CUDA-IPC device indices across processes (no-op where absent)."""
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions  # noqa: PLC0415
    except ImportError:
        try:
            from sglang.srt.patch_torch import monkey_patch_torch_reductions  # noqa: PLC0415
        except ImportError:
            return
    monkey_patch_torch_reductions()


def flattened_payloads(named_tensors: Sequence[NamedTensor], tp_size: int) -> tuple[list[Any], Any]:
    """``update_weights_from_tensor`` arguments of one same-dtype bucket in SGLang's
    ``flattened_bucket`` format: one serialized ``{"flattened_tensor", "metadata"}`` per TP
    rank, and the flat tensor (keep it alive until the call returned)."""
    from sglang.srt.utils import MultiprocessingSerializer  # noqa: PLC0415

    import torch  # noqa: PLC0415

    metadata_class = _sglang_flat_metadata_class()
    flat, metadata = flatten_tensors(named_tensors)
    if flat.device.type == "cpu" and torch.cuda.is_available():
        flat = flat.cuda()  # a CUDA-IPC handle, not a host copy through shared memory
    if flat.is_cuda:  # SGLang's patch assumes CUDA's reduction layout: CPU tensors fail to pickle with it
        _patch_torch_reductions()
    data = {"flattened_tensor": flat, "metadata": [metadata_class(**asdict(meta)) for meta in metadata]}
    payload = MultiprocessingSerializer.serialize(data, output_str=True)
    return [payload] * tp_size, flat


def answer_outcome(answer: Any) -> tuple[bool, str]:
    """``(success, message)`` of an SGLang answer: a ``(bool, message)`` pair, a
    ``{"success", "message"}`` body or an object with ``success`` / ``message`` attributes
    (anything else counts as success)."""
    if isinstance(answer, dict):
        return bool(answer.get("success", True)), str(answer.get("message", ""))
    if isinstance(answer, (tuple, list)) and answer and isinstance(answer[0], bool):
        return answer[0], str(answer[1]) if len(answer) > 1 else ""
    if hasattr(answer, "success"):
        return bool(answer.success), str(getattr(answer, "message", "") or "")
    return True, ""


def check_answer(answer: Any, what: str, copied: int) -> None:
    """Raise ``WeightSyncError`` with SGLang's message on a failed answer; ``copied`` = tensors
    of this update already loaded before the failing call (0: the previous weights are intact)."""
    success, message = answer_outcome(answer)
    if success:
        return
    if copied:
        state = (f"{copied} tensors of this update were already loaded, so the engine may hold a mix "
                 f"of old and new weights: sync again")
    else:
        state = "nothing of this update was loaded: the engine keeps its previous weights"
    raise WeightSyncError(f"SGLang {what} failed: {message or repr(answer)}; {state}")


def has_update_session(engine: Any) -> bool:
    """Whether an ``sglang.Engine`` gates updates in a session (SGLang >= 0.5.21 has
    ``begin_weight_update`` / ``end_weight_update``; 0.5.20 has neither)."""
    return callable(getattr(engine, "begin_weight_update", None)) and \
        callable(getattr(engine, "end_weight_update", None))


def _ipc_collect() -> None:
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.ipc_collect()


class SGLangRolloutEngine(RolloutEngine):
    """A colocated ``sglang.Engine`` (same node, same devices as the trainer; verified on CPU).
    Each update runs in SGLang's update session where it has one; buckets go through
    ``update_weights_from_tensor`` (GPU: CUDA-IPC handles, so export them on the GPU with
    ``iter_hf_weight_buckets(..., device="cuda")``; CPU: shared memory)."""

    def __init__(self, model_path: str | Path, *, tp_size: int = 1, flatten: bool = True,
                 memory_saver: bool | None = None, **server_args: Any) -> None:
        """model_path: HF folder the engine starts from (its names and shapes are what weight
        updates are checked against); tp_size: the engine's tensor parallelism; flatten: send
        each same-dtype bucket as one flat tensor (SGLang's ``flattened_bucket``) instead of
        one handle per tensor; memory_saver: ``enable_memory_saver`` (needed by sleep / wake,
        i.e. ``release_memory_occupation``; default: on with CUDA, off without; an
        ``enable_memory_saver`` in server_args wins); server_args: any other ``ServerArgs``
        (without CUDA, :data:`CPU_SERVER_ARGS` fill in what is not given)."""
        import torch  # noqa: PLC0415

        os.environ.update(sglang_environment())
        sglang = import_sglang()
        self.model_path, self.tp_size, self.flatten = Path(model_path), int(tp_size), flatten
        self._manifest: WeightManifest | None = None
        self._closed, self._session_open, self._asleep, self._loaded = False, False, False, 0
        if memory_saver is None:
            memory_saver = torch.cuda.is_available()
        server_args.setdefault("enable_memory_saver", memory_saver)
        self.memory_saver = bool(server_args["enable_memory_saver"])
        args = server_args_with_defaults(server_args)
        self.engine = sglang.Engine(model_path=str(model_path), tp_size=self.tp_size, **args)

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 *, progress: Callable[[int], None] | None = None) -> list[RolloutOutput]:
        results = self.engine.generate(**generate_request(prompt_token_ids, params))
        outputs = parse_generate_results(results, prompt_token_ids, params.n)
        if progress is not None:
            progress(len(outputs))
        return outputs

    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return parse_score_results(self.engine.generate(**score_request(sequences)), sequences)

    def weight_manifest(self) -> WeightManifest:
        if self._manifest is None:
            self._manifest = checkpoint_manifest(self.model_path)
        return self._manifest

    # ---------------------------------------------------------------------- weight update
    def begin_weight_update(self) -> None:
        """Open SGLang's update session (where it has one); a refusal raises before any copy."""
        self._loaded = 0
        if has_update_session(self.engine):  # entrypoints/engine.py Engine.begin_weight_update
            check_answer(self.engine.begin_weight_update(), "begin_weight_update", 0)
            self._session_open = True

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        """One ``update_weights_from_tensor`` call per dtype in the bucket (cache kept: the
        update's last step, ``finish_weight_update``, flushes it once)."""
        pairs = list(named_tensors)
        for group in split_by_dtype(pairs):
            if self.flatten:
                payloads, flat = flattened_payloads(group, self.tp_size)
                # entrypoints/engine.py Engine.update_weights_from_tensor -> model_executor/
                # model_runner_components/weight_updater.py WeightUpdater._update_weights_from_flattened_bucket
                answer = self.engine.update_weights_from_tensor(payloads, load_format=FLATTENED, flush_cache=False)
                del payloads, flat
            else:
                answer = self.engine.update_weights_from_tensor(group, flush_cache=False)
            check_answer(answer, "update_weights_from_tensor", self._loaded)
            self._loaded += len(group)
            _ipc_collect()
        return WeightLoadReport(num_tensors=len(pairs), num_bytes=bucket_bytes(pairs))

    def _end_session(self) -> None:
        if self._session_open:
            self._session_open = False
            # entrypoints/engine.py Engine.end_weight_update (re-processes the loaded weights)
            check_answer(self.engine.end_weight_update(), "end_weight_update", self._loaded)

    def finish_weight_update(self) -> None:
        """Close the session (SGLang re-processes the loaded weights), then flush the cache
        (its KV entries were computed with the old weights)."""
        self._end_session()
        check_answer(self.engine.flush_cache(), "flush_cache", self._loaded)

    def abort_weight_update(self) -> None:
        """A failed update still closes SGLang's session, so the engine serves and takes the
        next update (what was loaded so far stays loaded)."""
        try:
            self._end_session()
        except Exception as error:  # noqa: BLE001 - the update's own error is the one to raise
            logger.warning("SGLang end_weight_update after a failed update: %s", error)

    # -------------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        if self.memory_saver and not self._asleep:
            self.engine.release_memory_occupation()
            self._asleep = True

    def wake(self) -> None:
        """Resume only what :meth:`sleep` released: SGLang 0.5.23's resume of memory that was
        not released fails in the scheduler (``offload_tags.remove``), and the trainer's first
        sync wakes the engine before it ever slept."""
        if self._asleep:
            self.engine.resume_memory_occupation()
            self._asleep = False

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.shutdown()
