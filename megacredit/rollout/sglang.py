"""SGLang behind megacredit's RolloutEngine: request bodies, output parsing, colocated engine.

UNVERIFIED: SGLang needs CUDA (a CUDA torch build, sgl-kernel, flashinfer) and cannot be
installed or run on the CPU machines this project is built and tested on. Everything here is
written against SGLang's source (checked, see below) and unit-tested against fakes of SGLang;
it has never run against a real SGLang. ``tests/integration/test_sglang_gpu.py`` is the check to
run on a GPU machine before relying on it.

Checked in sgl-project/sglang (stored copies of its default branch):

* ``python/sglang/srt/entrypoints/engine.py``: ``Engine(**server_args)``; ``Engine.generate(
  input_ids=..., sampling_params=..., return_logprob=..., logprob_start_len=...)``;
  ``Engine.update_weights_from_tensor(named_tensors, load_format=None, flush_cache=True)`` which,
  for ``load_format="flattened_bucket"``, takes one pre-serialized payload per TP rank;
  ``Engine.flush_cache()``; ``Engine.release_memory_occupation(tags=None)`` /
  ``resume_memory_occupation(tags=None)``; ``Engine.shutdown()``.
* ``python/sglang/srt/model_executor/model_runner.py``: ``ModelRunner.update_weights_from_tensor``
  -> ``_update_weights_from_flattened_bucket`` reads ``{"flattened_tensor", "metadata"}`` (metadata
  items with ``name, shape, dtype, start_idx, end_idx, numel``) and calls ``model.load_weights``.
* ``python/sglang/srt/weight_sync/tensor_bucket.py``: ``FlattenedTensorBucket`` /
  ``FlattenedTensorMetadata`` (the layout of :mod:`megacredit.rollout.flat_buckets`).
* ``python/sglang/srt/sampling/sampling_params.py``: ``SamplingParams`` fields ``max_new_tokens``
  (>= 0), ``stop_token_ids``, ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (-1 = off),
  ``ignore_eos``, ``sampling_seed``.
* ``python/sglang/srt/managers/tokenizer_manager.py``: ``detokenize_logprob_tokens`` gives
  ``meta_info["output_token_logprobs"]`` / ``["input_token_logprobs"]`` as
  ``(logprob, token_id, text)`` triples; ``meta_info["finish_reason"]["type"]`` is "stop",
  "length" or "abort" (``schedule_batch.py`` ``FINISH_*.to_json``).
* ``Req._check_token_based_finish`` (``schedule_batch.py``): ``ignore_eos`` disables every stop
  token, and ``stop_token_ids`` are checked IN ADDITION to the model's EOS ids.

Semantics that differ from the embedded engine (documented in docs/engines.md):

* ``SamplingParams.stop_token_ids`` adds stop tokens to the model's EOS instead of replacing
  them; ``()`` (never stop) maps to ``ignore_eos``.
* Seeds go per request as ``sampling_seed``: sample j of prompt i of the step's whole batch
  gets ``request_seed(seed, (seed_offset + i) * n + j)``, so splitting the batch over engines
  does not change any request's seed; whether SGLang's sampler honours them depends on its
  version and server flags (not verifiable here).
* Log-probs: megacredit's contract is raw logits at temperature 1. The colocated engine sets
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` (unless already set) before starting SGLang so that
  sampled-token log-probs are taken before temperature; remote servers must be launched with
  it. The weight-sync probe scores at temperature 1, where both agree.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

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
    "SGLangRolloutEngine needs the `sglang` package, which requires a CUDA GPU: install it "
    "with `pip install 'megacredit[sglang]'` on a GPU machine (see docs/engines.md), or use "
    "rollout.engine=embedded (CPU) or rollout.engine=vllm."
)
FLATTENED = "flattened_bucket"


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


def check_answer(answer: Any, what: str, copied: int) -> None:
    """Raise ``WeightSyncError`` on SGLang's ``(False, message)`` / ``{"success": false}``."""
    success, message = True, ""
    if isinstance(answer, dict):
        success, message = bool(answer.get("success", True)), str(answer.get("message", ""))
    elif isinstance(answer, (tuple, list)) and answer and isinstance(answer[0], bool):
        success, message = answer[0], str(answer[1]) if len(answer) > 1 else ""
    elif hasattr(answer, "success"):
        success, message = bool(answer.success), str(getattr(answer, "message", ""))
    if not success:
        raise WeightSyncError(
            f"SGLang {what} failed: {message or answer!r}; {copied} tensors of this update were "
            f"already sent, so the engine may hold a mix of old and new weights: sync again"
        )


def _ipc_collect() -> None:
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.ipc_collect()


class SGLangRolloutEngine(RolloutEngine):
    """A colocated ``sglang.Engine`` (same node, same GPUs as the trainer). UNVERIFIED (no GPU
    here). Weights arrive by CUDA IPC through ``update_weights_from_tensor``; export them on
    the GPU (``iter_hf_weight_buckets(..., device="cuda")``) so no host copy is made."""

    def __init__(self, model_path: str | Path, *, tp_size: int = 1, flatten: bool = True,
                 memory_saver: bool = True, **server_args: Any) -> None:
        """model_path: HF folder the engine starts from (its names and shapes are what weight
        updates are checked against); tp_size: the engine's tensor parallelism; flatten: send
        each same-dtype bucket as one flat tensor (SGLang's ``flattened_bucket``) instead of
        one IPC handle per tensor; memory_saver: ``enable_memory_saver`` (needed by sleep /
        wake, i.e. ``release_memory_occupation``; an ``enable_memory_saver`` in server_args
        wins); server_args: any other ``ServerArgs``."""
        sglang = import_sglang()
        os.environ.setdefault("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
        self.model_path, self.tp_size, self.flatten = Path(model_path), int(tp_size), flatten
        self._manifest: WeightManifest | None = None
        self._closed = False
        server_args.setdefault("enable_memory_saver", memory_saver)
        self.engine = sglang.Engine(model_path=str(model_path), tp_size=self.tp_size, **server_args)

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

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        """One ``update_weights_from_tensor`` call per dtype in the bucket (cache kept: the
        update's last step, ``finish_weight_update``, flushes it once)."""
        pairs = list(named_tensors)
        for group in split_by_dtype(pairs):
            if self.flatten:
                payloads, flat = flattened_payloads(group, self.tp_size)
                answer = self.engine.update_weights_from_tensor(payloads, load_format=FLATTENED, flush_cache=False)
                del payloads, flat
            else:
                answer = self.engine.update_weights_from_tensor(group, flush_cache=False)
            check_answer(answer, "update_weights_from_tensor", len(pairs))
            _ipc_collect()
        return WeightLoadReport(num_tensors=len(pairs), num_bytes=bucket_bytes(pairs))

    def finish_weight_update(self) -> None:
        check_answer(self.engine.flush_cache(), "flush_cache", 0)

    def sleep(self) -> None:
        self.engine.release_memory_occupation()

    def wake(self) -> None:
        self.engine.resume_memory_occupation()

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.shutdown()
