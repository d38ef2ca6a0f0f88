"""Remote SGLang servers (``python -m sglang.launch_server``) behind the RolloutEngine interface.

UNVERIFIED against a real SGLang (no GPU here): the HTTP protocol below is written from
SGLang's source and tested against a local HTTP server that records requests and receives
the weights the way SGLang's ``ModelRunner`` does (tests/unit/test_sglang_server.py).

One :class:`SGLangServerEngine` stands for a fleet of SGLang workers: generation goes to a
router (``router_url``, e.g. SGLang Model Gateway, which balances) or is split by prompt,
contiguously and deterministically, across the worker URLs; control calls and weight updates
go to every worker. Endpoints used (sgl-project/sglang
``python/sglang/srt/entrypoints/http_server.py``): ``POST /generate``, ``GET /get_server_info``
(``tp_size``), ``POST /pause_generation`` (body ``{"mode": ...}`` on versions with
``PauseGenerationReqInput``, ignored by older ones), ``POST /continue_generation``,
``POST /flush_cache`` (400 while requests are in flight), ``POST /release_memory_occupation`` /
``/resume_memory_occupation``, ``POST /init_weights_update_group``,
``POST /update_weights_from_distributed``, ``POST /destroy_weights_update_group``; routers:
``GET /workers`` (``docs/advanced_features/sgl_model_gateway.md``).

Weight update by NCCL broadcast (``ModelRunner.init_weights_update_group`` /
``update_weights_from_distributed`` in ``python/sglang/srt/model_executor/model_runner.py``):
the sending trainer rank is rank 0 of a group of ``1 + sum(tp_size)`` ranks; worker k joins
at ``rank_offset = 1 + sum(tp_size of workers before k)`` (+ its TP rank). For each bucket the
trainer POSTs ``{names, dtypes, shapes, group_name, flush_cache, load_format}`` to every worker
(each blocks until it has received), then broadcasts from rank 0: one flat tensor per
same-dtype bucket with ``load_format="flattened_bucket"`` (the engine allocates the bucket
with ``FlattenedTensorBucket`` and broadcasts into it), or each tensor in order otherwise. With
pipeline parallelism every stage's first TP rank owns a group of its own
(``group_name=f"megacredit_pp{stage}"``) and sends its own stage's tensors.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import torch

from megacredit.rollout.base import (
    NamedTensor,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightBucket,
    WeightLoadReport,
    WeightManifest,
    bucket_bytes,
)
from megacredit.rollout.checkpoint_manifest import checkpoint_manifest
from megacredit.rollout.flat_buckets import flatten_tensors, split_by_dtype
from megacredit.rollout.http_json import EngineHTTPError, JSONClient, normalize_url
from megacredit.rollout.pool import contiguous_chunks
from megacredit.rollout.sglang import (
    FLATTENED,
    check_answer,
    generate_request,
    parse_generate_results,
    parse_score_results,
    score_request,
)

PAUSE_MODES = ("abort", "retract", "in_place")


def router_worker_urls(router_url: str, client: JSONClient) -> list[str]:
    """The worker URLs behind a router: ``GET /workers`` (SGLang Model Gateway), else the
    older ``GET /list_workers`` (``{"urls": [...]}``)."""
    for path, extract in (("/workers", lambda b: [w["url"] for w in b["workers"]]),
                          ("/list_workers", lambda b: b["urls"])):
        try:
            urls = extract(client.get(router_url, path))
        except (EngineHTTPError, KeyError, TypeError):
            continue
        if urls:
            return [normalize_url(u, "router worker") for u in urls]
    raise ValueError(f"rollout.router_url: {router_url} lists no workers (GET /workers, /list_workers)")


def route_address(url: str) -> str:
    """This host's IP address on the route to ``url``'s host (a UDP socket's local end after
    ``connect``; no packet is sent)."""
    parts = urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((parts.hostname, parts.port or 80))
        return sock.getsockname()[0]


def _check_future(future: Future, what: str, copied: int) -> None:
    """An update call's answer: SGLang reports failure as HTTP 400 + ``{"success": false}``."""
    try:
        answer = future.result()
    except EngineHTTPError as error:
        answer = {"success": False, "message": str(error)}
    check_answer(answer, what, copied)


class SGLangServerEngine(RolloutEngine):
    """SGLang servers already running elsewhere, reached over HTTP. UNVERIFIED (no GPU here)."""

    def __init__(self, urls: Sequence[str] = (), *, router_url: str | None = None,
                 model_path: str | Path | None = None, timeout: float = 600.0,
                 pause_around_updates: bool = True, pause_mode: str = "abort",
                 flatten: bool = True, sync_address: str | None = None, sync_backend: str = "nccl",
                 client: JSONClient | None = None) -> None:
        """urls: the workers (each 'host:port'); router_url: a router in front of them
        (generation goes through it; workers default to the router's list); model_path: the HF
        folder the servers were started from (its manifest checks updates before any copy;
        None = no check); pause_around_updates: pause generation before and flush + continue
        after ``update_weights_from_buckets`` (turn off on pipeline stages other than the one
        that coordinates, see docs/engines.md); flatten: one broadcast per same-dtype bucket;
        sync_address / sync_backend: where the servers reach this process for the broadcast
        group when the first update connects it by itself (default: this host's address on
        the route to the first worker; NCCL)."""
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {PAUSE_MODES}, got {pause_mode!r}")
        self.client = client or JSONClient(timeout)
        self.router_url = normalize_url(router_url, "rollout.router_url") if router_url else None
        workers = [normalize_url(u) for u in urls]
        if not workers and self.router_url:
            workers = router_worker_urls(self.router_url, self.client)
        if not workers:
            raise ValueError("SGLangServerEngine: give rollout.urls (the SGLang servers) or rollout.router_url")
        self.workers = workers
        self.model_path = Path(model_path) if model_path is not None else None
        self.pause_around_updates, self.pause_mode, self.flatten = pause_around_updates, pause_mode, flatten
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(workers)), thread_name_prefix="sglang-http")
        self._manifest: WeightManifest | None = None
        self._group: Any = None
        self._group_name: str | None = None
        self._device = torch.device("cpu")
        self._paused = False
        self.sync_address, self.sync_backend = sync_address, sync_backend

    # ------------------------------------------------------------------------- helpers
    def _on_all_workers(self, method: str, path: str, body: Any | None = None) -> list[Any]:
        futures = [self._pool.submit(self.client.request, method, url, path, body) for url in self.workers]
        return [future.result() for future in futures]

    def _batched(self, prompts: Sequence[Sequence[int]], call) -> list:
        """``call(url, start, end)`` on contiguous prompt chunks, one per target, concatenated."""
        targets = [self.router_url] if self.router_url else self.workers
        chunks = contiguous_chunks(len(prompts), len(targets))
        futures = [self._pool.submit(call, url, start, end) for url, (start, end) in zip(targets, chunks)]
        return [item for future in futures for item in future.result()]

    # ---------------------------------------------------------------------- generation
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 *, progress: Callable[[int], None] | None = None) -> list[RolloutOutput]:
        """Prompts split contiguously across the workers (or all to the router); each request
        carries its own seed from its index in the whole batch, so the split does not change
        what is sampled (as far as SGLang honours ``sampling_seed``)."""
        def call(url: str, start: int, end: int) -> list[RolloutOutput]:
            chunk = prompt_token_ids[start:end]
            shifted = dataclasses.replace(params, seed_offset=params.seed_offset + start)
            results = self.client.post(url, "/generate", generate_request(chunk, shifted))
            outputs = parse_generate_results(results, chunk, params.n)
            for output in outputs:
                output.prompt_index += start
            if progress is not None:
                progress(len(outputs))
            return outputs

        return self._batched(prompt_token_ids, call)

    def score_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        def call(url: str, start: int, end: int) -> list[list[float]]:
            chunk = sequences[start:end]
            return parse_score_results(self.client.post(url, "/generate", score_request(chunk)), chunk)

        if not sequences:
            raise ValueError("score_logprobs: give a non-empty list of sequences of >= 2 tokens")
        return self._batched(sequences, call)

    # -------------------------------------------------------------------- engine state
    def pause_generation(self) -> None:
        self._on_all_workers("POST", "/pause_generation", {"mode": self.pause_mode})

    def continue_generation(self) -> None:
        self._on_all_workers("POST", "/continue_generation", {})

    def flush_cache(self, wait_seconds: float = 60.0) -> None:
        """``/flush_cache`` on every worker, retried while a worker still has requests (400)."""
        deadline = time.monotonic() + wait_seconds
        for url in self.workers:
            while True:
                try:
                    self.client.post(url, "/flush_cache", {})
                    break
                except EngineHTTPError as error:
                    if "HTTP 400" not in str(error) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def sleep(self) -> None:
        self._on_all_workers("POST", "/release_memory_occupation", {})

    def wake(self) -> None:
        self._on_all_workers("POST", "/resume_memory_occupation", {})

    def weight_manifest(self) -> WeightManifest | None:
        if self.model_path is None:
            return None
        if self._manifest is None:
            self._manifest = checkpoint_manifest(self.model_path)
        return self._manifest

    # ---------------------------------------------------------------- weight transport
    def tp_sizes(self) -> list[int]:
        """Each worker's tensor-parallel size (``/get_server_info``); one engine per server."""
        sizes = []
        for url, info in zip(self.workers, self._on_all_workers("GET", "/get_server_info")):
            for field in ("dp_size", "pp_size"):
                if int(info.get(field, 1) or 1) != 1:
                    raise ValueError(f"SGLang server {url} runs {field}={info[field]}; the NCCL weight "
                                     f"update needs one engine per server (launch one server per replica)")
            sizes.append(int(info["tp_size"]))
        return sizes

    def connect_weight_sync(self, master_address: str, master_port: int, *,
                            group_name: str = "megacredit_pp0", backend: str = "nccl") -> None:
        """Create the broadcast group: every worker joins (``/init_weights_update_group``)
        while this process joins as rank 0. Call on the sending rank (a pipeline stage's
        first TP rank), once, before the first update; ``master_address`` must be reachable
        from the servers."""
        from megacredit.rollout.weight_group import join_weight_update_group  # noqa: PLC0415

        sizes = self.tp_sizes()
        world_size, offsets = 1 + sum(sizes), [1 + sum(sizes[:k]) for k in range(len(sizes))]
        futures = [
            self._pool.submit(self.client.post, url, "/init_weights_update_group", {
                "master_address": master_address, "master_port": int(master_port), "rank_offset": offset,
                "world_size": world_size, "group_name": group_name, "backend": backend})
            for url, offset in zip(self.workers, offsets)
        ]
        self._group = join_weight_update_group(master_address, master_port, world_size, 0, group_name, backend)
        self._group_name = group_name
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        for url, future in zip(self.workers, futures):
            _check_future(future, f"init_weights_update_group on {url}", 0)

    def disconnect_weight_sync(self) -> None:
        if self._group is None:
            return
        self._on_all_workers("POST", "/destroy_weights_update_group", {"group_name": self._group_name})
        torch.distributed.destroy_process_group(self._group)
        self._group, self._group_name = None, None

    def load_weights(self, named_tensors: Iterable[NamedTensor]) -> WeightLoadReport:
        """Broadcast one bucket to every worker (call :meth:`connect_weight_sync` first). With
        NCCL, tensors not on this rank's GPU are copied there first (export them on the GPU,
        ``device=ctx.device``, to avoid the copy)."""
        if self._group is None:
            raise RuntimeError("SGLangServerEngine.load_weights: no broadcast group; update through "
                               "update_weights_from_buckets (it connects one) or call connect_weight_sync")
        pairs = list(named_tensors)
        for group in split_by_dtype(pairs):
            self._broadcast_bucket(group, copied=len(pairs))
        return WeightLoadReport(num_tensors=len(pairs), num_bytes=bucket_bytes(pairs))

    def _broadcast_bucket(self, pairs: list[NamedTensor], copied: int) -> None:
        body = {
            "names": [name for name, _ in pairs],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in pairs],
            "shapes": [list(t.shape) for _, t in pairs],
            "group_name": self._group_name,
            "flush_cache": False,
        }
        if self.flatten:
            body["load_format"] = FLATTENED
        futures: list[Future] = [self._pool.submit(self.client.post, url, "/update_weights_from_distributed", body)
                                 for url in self.workers]
        if self.flatten:
            flat, _ = flatten_tensors(pairs)
            torch.distributed.broadcast(flat.to(self._device), src=0, group=self._group)
            del flat
        else:  # NCCL needs the tensors on this rank's GPU (a no-op when they already are)
            handles = [torch.distributed.broadcast(t.to(self._device).contiguous(), src=0, group=self._group,
                                                   async_op=True) for _, t in pairs]
            for handle in handles:
                handle.wait()
        for url, future in zip(self.workers, futures):
            _check_future(future, f"update_weights_from_distributed on {url}", copied)

    def begin_weight_update(self) -> None:
        """Connect the broadcast group if nobody did (group ``megacredit_pp0``), then pause."""
        if self._group is None:
            from megacredit.rollout.weight_group import free_port  # noqa: PLC0415

            address = self.sync_address or route_address(self.workers[0])
            self.connect_weight_sync(address, free_port(), backend=self.sync_backend)
        if self.pause_around_updates:
            self.pause_generation()
            self._paused = True

    def finish_weight_update(self) -> None:
        if self._paused:
            self.flush_cache()
            self.continue_generation()
            self._paused = False

    def update_weights_from_buckets(self, buckets: Iterable[WeightBucket],
                                    manifest: Mapping[str, Sequence[int]] | None = None) -> WeightLoadReport:
        """The interface's checked update; with ``pause_around_updates`` the workers pause
        before the first bucket and flush + continue after the last, and continue also when
        the update fails half-way (the trainer then stops with the error)."""
        try:
            return super().update_weights_from_buckets(buckets, manifest)
        finally:
            if self._paused:
                self._paused = False
                self.continue_generation()

    def shutdown(self) -> None:
        """Leave the broadcast group and stop the HTTP threads (the servers keep running:
        they were not started by megacredit)."""
        try:
            self.disconnect_weight_sync()
        finally:
            self._pool.shutdown(wait=False)

    def health_problem(self) -> str | None:
        """The first of the router and the workers that does not answer ``GET /health``
        (``python/sglang/srt/entrypoints/http_server.py``), None when all do."""
        for url in ([self.router_url] if self.router_url else []) + self.workers:
            problem = self.client.health_problem(url, "/health")
            if problem is not None:
                return problem
        return None
