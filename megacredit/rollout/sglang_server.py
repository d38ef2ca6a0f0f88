"""Remote SGLang servers (``python -m sglang.launch_server``) behind the RolloutEngine interface,
and a launcher that starts such a server as a subprocess and stops it by its PID.

VERIFIED ON CPU with SGLang 0.5.23 servers (``--device cpu``; tests/sglang_cpu/): generation
split across servers, probe scoring, weight updates by ``update_weights_from_distributed`` over
a **gloo** group inside SGLang's update session, refused updates, the sync check, whole
training runs. UNVERIFIED (GPU only, no GPU here): the same broadcast over NCCL, CUDA servers,
``release_memory_occupation``. The 0.5.20 protocol (no update session) is tested against the
recording stand-in server (tests/unit/sglang_fake_server.py).

One :class:`SGLangServerEngine` stands for a fleet of SGLang workers: generation goes to a
router (``router_url``, e.g. SGLang Model Gateway, which balances) or is split by prompt,
contiguously and deterministically, across the worker URLs; control calls and weight updates
go to every worker. The trainer builds one engine per worker behind an
:class:`~megacredit.rollout.pool.EnginePool` when there is no router (a server that dies is
survived, docs/reliability.md), and one engine over the router's workers otherwise. Endpoints
used, as found in SGLang 0.5.23's ``python/sglang/srt/entrypoints/http_server.py``: ``POST /generate``; ``GET /server_info``
(``tp_size``, ``dp_size``, ``pp_size``; ``/get_server_info`` on servers without it);
``POST /pause_generation`` (``PauseGenerationReqInput``: ``{"mode": ...}``) and
``/continue_generation``; ``POST /flush_cache`` (400 while requests are in flight);
``POST /begin_weight_update`` / ``/end_weight_update`` (0.5.21+; 404 on 0.5.20, whose servers
take updates without a session); ``POST /release_memory_occupation`` /
``/resume_memory_occupation``; ``POST /init_weights_update_group``,
``/update_weights_from_distributed``, ``/destroy_weights_update_group`` (each answers
``{"success", "message"}``, HTTP 400 on failure); routers: ``GET /workers``
(``docs/advanced_features/sgl_model_gateway.md``).

Weight update by broadcast (``model_executor/model_runner_components/weight_updater.py``:
``WeightUpdater.init_weights_update_group``, ``receive_weights_from_distributed``,
``load_weights_from_distributed``; ``managers/scheduler_components/weight_updater.py``:
``SchedulerWeightUpdaterManager.update_weights_from_distributed``, which refuses a call
outside a session BEFORE receiving): the sending trainer rank is rank 0 of a group of
``1 + sum(tp_size)`` ranks; worker k joins at ``rank_offset = 1 + sum(tp_size of workers
before k)`` (+ its TP rank). For each bucket the trainer POSTs ``{names, dtypes, shapes,
group_name, flush_cache, load_format}`` to every worker (each receives, then loads), then
broadcasts from rank 0: one flat tensor per same-dtype bucket with
``load_format="flattened_bucket"`` (the engine allocates it with ``FlattenedTensorBucket``), or
each tensor in order otherwise. The broadcast runs asynchronously while the workers' answers are
watched: a worker that answers before receiving (refused, no group, gone) fails the update at
once instead of leaving this rank in a broadcast nobody receives, and the whole bucket is
bounded by ``update_timeout``. With pipeline parallelism every stage's first TP rank owns a
group of its own (``group_name=f"megacredit_pp{stage}"``) and sends its own stage's tensors,
while one coordinator opens and closes the update (:meth:`SGLangServerEngine.open_update` /
:meth:`~SGLangServerEngine.close_update`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

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
from megacredit.rollout.checkpoint_manifest import checkpoint_manifest
from megacredit.rollout.flat_buckets import flatten_tensors, split_by_dtype
from megacredit.rollout.http_json import (
    HEALTH_TIMEOUT_S,
    EngineHTTPError,
    EngineUnreachableError,
    JSONClient,
    normalize_url,
)
from megacredit.rollout.pool import contiguous_chunks
from megacredit.rollout.server_process import ServerProcess
from megacredit.rollout.sglang import (
    FLATTENED,
    answer_outcome,
    check_answer,
    generate_request,
    parse_generate_results,
    parse_score_results,
    score_request,
    server_args_with_defaults,
    sglang_environment,
)

PAUSE_MODES = ("abort", "retract", "in_place")
logger = logging.getLogger(__name__)


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


def _check_future(future: Future, what: str, copied: int) -> None:
    """An update call's answer: SGLang reports failure as HTTP 400 + ``{"success": false}``."""
    try:
        answer = future.result()
    except EngineHTTPError as error:
        answer = {"success": False, "message": str(error)}
    check_answer(answer, what, copied)


def _checker(what: str, copied: int) -> Callable[[str, Future], None]:
    """:func:`_check_future` for the watched calls of megacredit.rollout.weight_group."""
    return lambda url, future: _check_future(future, f"{what} on {url}", copied)


class SGLangServerEngine(RolloutEngine):
    """SGLang servers already running elsewhere, reached over HTTP (see the module docstring)."""

    def __init__(self, urls: Sequence[str] = (), *, router_url: str | None = None,
                 model_path: str | Path | None = None, timeout: float = 600.0,
                 pause_around_updates: bool = True, pause_mode: str = "abort",
                 flatten: bool = True, sync_address: str | None = None, sync_backend: str = "nccl",
                 update_timeout: float | None = None, client: JSONClient | None = None,
                 server: ServerProcess | None = None) -> None:
        """urls: the workers (each 'host:port'); router_url: a router in front of them
        (generation goes through it; workers default to the router's list); model_path: the HF
        folder the servers were started from (its manifest checks updates before any copy;
        None = only SGLang's own loader checks, after the transfer); pause_around_updates:
        ``update_weights_from_buckets`` opens and closes the update itself (:meth:`open_update`
        before the first bucket, :meth:`close_update` after the last; turn off on pipeline
        stages other than the coordinating one, see docs/engines.md); flatten: one broadcast
        per same-dtype bucket; sync_address / sync_backend: where the servers reach this
        process for the broadcast group when the first update connects it by itself (default:
        this host's address on the route to the first worker; NCCL, gloo on CPU);
        update_timeout: longest wait for one bucket's broadcast and answers, or for the group
        to form (default: ``timeout``); server: the :class:`SGLangServer` that started the one
        worker, when megacredit did (then :meth:`restart` restarts it)."""
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
        if server is not None and len(workers) != 1:
            raise ValueError(f"SGLangServerEngine: server= is the launcher of one worker; got {len(workers)} workers")
        self.server = server
        self.model_path = Path(model_path) if model_path is not None else None
        self.pause_around_updates, self.pause_mode, self.flatten = pause_around_updates, pause_mode, flatten
        self.update_timeout = float(timeout if update_timeout is None else update_timeout)
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(workers)), thread_name_prefix="sglang-http")
        self._manifest: WeightManifest | None = None
        self._group: Any = None
        self._group_name: str | None = None
        self._device = torch.device("cpu")
        self._paused = False
        self._memory_saver: bool | None = None
        self._asleep = False
        self._sessions: list[str] = []  # workers with an open update session
        self._loaded = 0  # tensors of the current update loaded so far
        self.sync_address, self.sync_backend = sync_address, sync_backend

    @property
    def url(self) -> str:
        """Where the engine is reached (named in the pool's fault messages): the router, else
        the worker(s)."""
        return self.router_url or ", ".join(self.workers)

    # ------------------------------------------------------------------------- helpers
    def _submit_to_all(self, method: str, path: str, body: Any | None = None,
                       urls: Sequence[str] | None = None) -> dict[str, Future]:
        return {url: self._pool.submit(self.client.request, method, url, path, body)
                for url in (self.workers if urls is None else urls)}

    def _on_all_workers(self, method: str, path: str, body: Any | None = None) -> list[Any]:
        return [future.result() for future in self._submit_to_all(method, path, body).values()]

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
        what is sampled where SGLang honours ``sampling_seed`` (docs/engines.md)."""
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
                    if error.status != 400 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def memory_saver(self) -> bool:
        """Whether every worker runs with ``--enable-memory-saver``, which release / resume
        need (asked once, ``/server_info``). Without it SGLang 0.5.23's
        ``resume_memory_occupation`` fails inside the scheduler (nothing was released) and
        the server dies (seen on CPU), so sleep / wake are no-ops then."""
        if self._memory_saver is None:
            self._memory_saver = all(bool(self._server_info(url).get("enable_memory_saver"))
                                     for url in self.workers)
        return self._memory_saver

    def sleep(self) -> None:
        if not self._asleep and self.memory_saver():
            self._on_all_workers("POST", "/release_memory_occupation", {})
            self._asleep = True

    def wake(self) -> None:
        """Resume only what :meth:`sleep` released: SGLang 0.5.23's resume of memory that was
        not released fails inside the scheduler (``offload_tags.remove``) and the server dies,
        and the trainer's first sync wakes the engine before it ever slept."""
        if self._asleep:
            self._on_all_workers("POST", "/resume_memory_occupation", {})
            self._asleep = False

    def weight_manifest(self) -> WeightManifest | None:
        if self.model_path is None:
            return None
        if self._manifest is None:
            self._manifest = checkpoint_manifest(self.model_path)
        return self._manifest

    # ----------------------------------------------------------------- update session
    def _open_sessions(self) -> None:
        """``/begin_weight_update`` on every worker; a 404 is a server without sessions
        (SGLang 0.5.20), which takes updates as they come. Any refusal closes the sessions
        opened so far and raises."""
        failures = []
        # entrypoints/http_server.py begin_weight_update -> SchedulerWeightUpdaterManager.begin_weight_update
        for url, future in self._submit_to_all("POST", "/begin_weight_update", {}).items():
            try:
                success, message = answer_outcome(future.result())
            except EngineHTTPError as error:
                if error.status == 404:
                    continue
                success, message = False, str(error)
            if success:
                self._sessions.append(url)
            else:
                failures.append(f"{url}: {message}")
        if failures:
            self._close_sessions(quiet=True)
            check_answer((False, "; ".join(failures)), "begin_weight_update", 0)

    def _close_sessions(self, quiet: bool = False) -> None:
        """``/end_weight_update`` on every worker with an open session (SGLang re-processes
        the loaded weights); the first failure raises after all answered, unless ``quiet``."""
        urls, self._sessions = self._sessions, []
        errors = []
        # entrypoints/http_server.py end_weight_update -> SchedulerWeightUpdaterManager.end_weight_update
        for url, future in self._submit_to_all("POST", "/end_weight_update", {}, urls).items():
            try:
                _check_future(future, f"end_weight_update on {url}", self._loaded)
            except WeightSyncError as error:
                errors.append(error)
        for error in errors[1:] if not quiet else errors:
            logger.warning("%s", error)
        if errors and not quiet:
            raise errors[0]

    def open_update(self) -> None:
        """Prepare every worker for an update: pause generation (``pause_mode``), then open
        SGLang's update session where the server has one. The coordinating rank calls it once
        before the senders' first bucket (``update_weights_from_buckets`` does it itself with
        ``pause_around_updates``); a refusal continues generation and raises."""
        self.pause_generation()
        self._paused = True
        try:
            self._open_sessions()
        except BaseException:
            self._continue_quietly()
            raise

    def close_update(self) -> None:
        """End an update on every worker: close the session, flush the prefix cache (its
        entries came from the old weights), continue generation."""
        self._close_sessions()
        self.flush_cache()
        self.continue_generation()
        self._paused = False

    def _continue_quietly(self) -> None:
        if self._paused:
            self._paused = False
            try:
                self.continue_generation()
            except EngineHTTPError as error:
                logger.warning("SGLang continue_generation after a failed update: %s", error)

    # ---------------------------------------------------------------- weight transport
    def _server_info(self, url: str) -> dict[str, Any]:
        """A worker's ``ServerArgs`` and state: ``/server_info``, or ``/get_server_info`` on
        servers without it."""
        try:
            return self.client.get(url, "/server_info")
        except EngineHTTPError as error:
            if error.status != 404:
                raise
            return self.client.get(url, "/get_server_info")

    def tp_sizes(self) -> list[int]:
        """Each worker's tensor-parallel size; one engine per server."""
        sizes = []
        for url in self.workers:
            info = self._server_info(url)
            for field in ("dp_size", "pp_size"):
                if int(info.get(field, 1) or 1) != 1:
                    raise ValueError(f"SGLang server {url} runs {field}={info[field]}; the broadcast weight "
                                     f"update needs one engine per server (launch one server per replica)")
            sizes.append(int(info["tp_size"]))
        return sizes

    def connect_weight_sync(self, master_address: str, master_port: int, *,
                            group_name: str = "megacredit_pp0", backend: str = "nccl") -> None:
        """Create the broadcast group: every worker joins (``/init_weights_update_group``)
        while this process joins as rank 0. Call on the sending rank (a pipeline stage's
        first TP rank), once, before the first update; ``master_address`` must be reachable
        from the servers. A worker that refuses fails the call at once (this rank does not
        wait in the rendezvous for it), within ``update_timeout`` in any case."""
        from megacredit.rollout.weight_group import join_watching  # noqa: PLC0415

        sizes = self.tp_sizes()
        world_size, offsets = 1 + sum(sizes), [1 + sum(sizes[:k]) for k in range(len(sizes))]
        futures = {url: self._pool.submit(self.client.post, url, "/init_weights_update_group", {
            "master_address": master_address, "master_port": int(master_port), "rank_offset": offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})
            for url, offset in zip(self.workers, offsets)}
        self._group = join_watching(master_address, master_port, world_size, group_name, backend, futures,
                                    _checker("init_weights_update_group", 0), self.update_timeout,
                                    "SGLang init_weights_update_group")
        self._group_name = group_name
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def disconnect_weight_sync(self) -> None:
        """Both sides leave the broadcast group; a worker that is gone (killed) took its side
        with it, so only this side is destroyed for it."""
        if self._group is None:
            return
        from megacredit.rollout.weight_group import release_group_name  # noqa: PLC0415

        try:
            for future in self._submit_to_all("POST", "/destroy_weights_update_group",
                                              {"group_name": self._group_name}).values():
                try:
                    future.result()
                except EngineUnreachableError:
                    pass  # the server died: nothing of the group is left on its side
        finally:
            torch.distributed.destroy_process_group(self._group)
            release_group_name(self._group_name)
            self._group, self._group_name = None, None

    def _abandon_group(self) -> None:
        """After a broadcast that did not complete the group's state is unknown (this rank's
        send stays pending until the group's timeout; a worker may wait in a receive until its
        own): forget it; the next update connects a new group under a new name (the old one
        stays registered in this process)."""
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
            self._broadcast_bucket(group)
            self._loaded += len(group)
        return WeightLoadReport(num_tensors=len(pairs), num_bytes=bucket_bytes(pairs))

    def _broadcast_bucket(self, pairs: list[NamedTensor]) -> None:
        """POST the bucket's description to every worker, broadcast it asynchronously while
        watching their answers, then wait for every answer (each after its load)."""
        body = {
            "names": [name for name, _ in pairs],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in pairs],
            "shapes": [list(t.shape) for _, t in pairs],
            "group_name": self._group_name,
            "flush_cache": False,
        }
        if self.flatten:
            body["load_format"] = FLATTENED
        # entrypoints/http_server.py update_weights_from_distributed -> SchedulerWeightUpdaterManager.
        # update_weights_from_distributed -> WeightUpdater.receive_weights_from_distributed + load_weights
        futures = self._submit_to_all("POST", "/update_weights_from_distributed", body)
        # NCCL needs the tensors on this rank's GPU (a no-op when they already are there)
        if self.flatten:
            tensors = [flatten_tensors(pairs)[0].to(self._device)]
        else:
            tensors = [t.to(self._device).contiguous() for _, t in pairs]
        from megacredit.rollout.weight_group import broadcast_watching  # noqa: PLC0415

        what = "update_weights_from_distributed"
        broadcast_watching(tensors, self._group, futures, _checker(what, self._loaded), self.update_timeout,
                           f"SGLang {what}: not done after {self.update_timeout:.0f} s; {self._loaded} tensors "
                           "of this update were already loaded", self._abandon_group)

    # ------------------------------------------------------------------ update hooks
    def begin_weight_update(self) -> None:
        """Connect the broadcast group if nobody did (group ``megacredit_pp0``, or
        ``megacredit_pp0_K`` when this process holds that name already: another engine of a
        pool, an abandoned group), then, with ``pause_around_updates``, :meth:`open_update`."""
        self._loaded = 0
        if self._group is None:
            from megacredit.rollout.weight_group import free_port, reserve_group_name, route_address  # noqa: PLC0415

            address = self.sync_address or route_address(self.workers[0])
            self.connect_weight_sync(address, free_port(), group_name=reserve_group_name("megacredit_pp0"),
                                     backend=self.sync_backend)
        if self.pause_around_updates:
            self.open_update()

    def finish_weight_update(self) -> None:
        if self.pause_around_updates:
            self.close_update()

    def abort_weight_update(self) -> None:
        """A failed update still closes the workers' sessions and continues their generation
        (the trainer then stops with the update's error)."""
        if self._sessions:
            self._close_sessions(quiet=True)
        self._continue_quietly()

    def shutdown(self) -> None:
        """Leave the broadcast group and stop the HTTP threads (the servers keep running:
        they were not started by megacredit)."""
        try:
            self.disconnect_weight_sync()
        finally:
            self._pool.shutdown(wait=False)

    def health_problem(self) -> str | None:
        """The first of the router and the workers that does not answer its health check, None
        when all do (``python/sglang/srt/entrypoints/http_server.py``): ``GET /health``
        (``health_generate``: a one-token generation, 503 after ``SGLANG_HEALTH_CHECK_TIMEOUT``,
        20 s), except inside an update, where generation is paused and /health answers 503 (seen
        on CPU): then ``GET /ping`` (``sagemaker_health``: a flag check that a pause leaves at 200;
        unverified on servers older than 0.5.23)."""
        path = "/ping" if self._paused else "/health"
        for url in ([self.router_url] if self.router_url else []) + self.workers:
            problem = self.client.health_problem(url, path, timeout=HEALTH_TIMEOUT_S)
            if problem is not None:
                return problem
        return None

    def restart(self) -> bool:
        """The pool calls it when the engine left it. First the broadcast group and the update
        state are forgotten in any case (a server that comes back, restarted by anyone, has
        neither; the engine joins it to a new group at the weight update it rejoins with). Then
        the server megacredit started (``server``) is stopped by its PID and started again;
        False without a ``server``: somebody else runs it."""
        self._abandon_group()
        self._sessions, self._paused, self._asleep, self._memory_saver = [], False, False, None
        if self.server is None:
            return False
        self.server.stop()
        self.server.start()
        return True


# ----------------------------------------------------------------------------- launcher
def cli_flags(server_args: Mapping[str, Any]) -> list[str]:
    """``ServerArgs`` keywords -> ``launch_server`` flags: ``{"max_total_tokens": 4096,
    "disable_cuda_graph": True}`` -> ``--max-total-tokens 4096 --disable-cuda-graph`` (False
    and None are left out)."""
    flags: list[str] = []
    for key, value in server_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags


class SGLangServer(ServerProcess):
    """``python -m sglang.launch_server`` as a subprocess on a free 127.0.0.1 port, in its own
    process group (stopped by its PID, scheduler and detokenizer included); started, without
    CUDA, with SGLang's CPU engine
    (``megacredit.rollout.sglang.CPU_SERVER_ARGS``). Use as a context manager."""

    name = "sglang"

    def __init__(self, model_path: str | Path, *, server_args: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        """server_args: ``ServerArgs`` keywords (e.g. ``{"dtype": "float32"}``), given as flags."""
        super().__init__(model_path, **kwargs)
        self.server_args = dict(server_args or {})

    def command(self) -> list[str]:
        args = server_args_with_defaults(self.server_args)
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--host", "127.0.0.1", "--port", str(self.port), *cli_flags(args), *self.extra_args]

    def environment(self) -> dict[str, str]:
        return sglang_environment({**os.environ, **self.env})
