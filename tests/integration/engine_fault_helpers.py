"""Shared pieces of the rollout-server fault tests (vLLM: test_engine_faults.py; SGLang:
tests/sglang_cpu/test_sglang_faults_cpu.py): ``megacredit train`` as a subprocess, waits bounded in
time, a server killed by its process group, and the checks of a survived fault and of a run left
without servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from trainer_helpers import read_losses

HERE = Path(__file__).resolve().parent
RUN_TIMEOUT_S = 900
COMPARED = ("train/loss", "train/grad_norm", "rollout/reward_mean", "rollout/response_length_mean")


def kill_server(server) -> None:
    """SIGKILL the server's whole process group (API server, engine core / scheduler, detokenizer)
    by its PID, then reap it."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.stop()


def start_training(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """``megacredit train`` with ``overrides`` in a session of its own (killed by its PID on a timeout)."""
    config = run_dir.parent / f"{run_dir.name}_empty.yaml"
    config.write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "megacredit.cli", "train", str(config), *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[str, str]:
    """Wait for the run; on timeout kill its process group (by its PID) and fail."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()
        raise AssertionError(f"the run did not end within {timeout} s:\n{output[1][-3000:]}") from None


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ((run_dir / "metrics.jsonl").exists() and step in read_losses(run_dir)):
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not logged within {RUN_TIMEOUT_S} s"
        time.sleep(0.05)


def wait_for_request(process: subprocess.Popen, port: int, timeout: float = 120.0) -> None:
    """Until the trainer holds an open connection to ``port`` (a request in flight)."""
    import psutil

    trainer = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in trainer.net_connections(kind="tcp")):
            return
        time.sleep(0.01)
    raise AssertionError(f"no request to port {port} within {timeout} s")


def _check_survived_generate_fault(stderr: str, url: str, expected_dir: Path, got_dir: Path) -> None:
    """A 3-step run whose engine 1 (``url``) was killed while it generated step 2: one warning
    naming it and the cause, the fault counted at step 2, one engine serving afterwards, and every
    step's metrics equal to the run without the fault (``expected_dir``): the trainer's figures to
    1e-6 relative (the same tokens, the same computation), the engine's log-prob mismatch within
    1e-4 (the moved prompts were computed in another batch)."""
    warnings = [line for line in stderr.splitlines() if "failed during" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"megacredit: warning: rollout engine 1 ({url}) "
                                                         "failed during generate ("), stderr[-3000:]
    expected, got = read_losses(expected_dir), read_losses(got_dir)
    assert [got[s]["rollout/engine_faults"] for s in (1, 2, 3)] == [0, 1, 0]
    assert [got[s]["rollout/engines_serving"] for s in (1, 2, 3)] == [2, 1, 1]
    for step in (1, 2, 3):
        for name in COMPARED:
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-9), (step, name)
        assert got[step]["rollout/logprob_abs_diff"] == pytest.approx(expected[step]["rollout/logprob_abs_diff"],
                                                                      abs=1e-4)


def _check_stopped_for_want_of_engines(run: subprocess.Popen, stderr: str, url: str, seconds: float) -> None:
    """The run's only server (``url``) was killed ``seconds`` before the run ended: one line,
    exit status 3, no traceback, within 120 s."""
    assert seconds < 120, "the run did not stop promptly"
    assert run.returncode == 3, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("megacredit: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert errors[0].startswith("megacredit: error: no rollout engine is left for ") and \
        f"engine 0 ({url}) failed during" in errors[0] and "checkpoint.resume=auto" in errors[0], errors[0]


def check_a_kill_mid_generation(tmp_path: Path, overrides: Callable[[Path, list[str]], list[str]], servers) -> None:
    """A 3-step run over both ``servers`` (``overrides(run_dir, urls)``) without a fault, then the
    same run with server 1 SIGKILLed while it generates step 2 (the trainer's only request to it
    then): the faulted run completes and equals the first (:func:`_check_survived_generate_fault`)."""
    urls = [server.url for server in servers]
    reference = start_training(tmp_path / "reference", overrides(tmp_path / "reference", urls))
    _, stderr = finish(reference)
    assert reference.returncode == 0, stderr[-3000:]
    faulted = start_training(tmp_path / "faulted", overrides(tmp_path / "faulted", urls))
    wait_for_step(tmp_path / "faulted", 1, faulted)
    wait_for_request(faulted, servers[1].port)  # step 2's generation on server 1
    kill_server(servers[1])
    _, stderr = finish(faulted)
    assert faulted.returncode == 0, stderr[-3000:]
    _check_survived_generate_fault(stderr, urls[1], tmp_path / "reference", tmp_path / "faulted")


def check_a_kill_of_the_only_server(run_dir: Path, overrides: list[str], server) -> None:
    """A run over ``server`` alone, which is SIGKILLed after step 1: the run stops with one line
    (:func:`_check_stopped_for_want_of_engines`)."""
    run = start_training(run_dir, overrides)
    wait_for_step(run_dir, 1, run)
    kill_server(server)
    killed_at = time.monotonic()
    _, stderr = finish(run, timeout=300)
    _check_stopped_for_want_of_engines(run, stderr, server.url, time.monotonic() - killed_at)
