"""A trainer rank that dies or hangs, under torchrun (2 processes, TP=2, gloo): nothing outlives a
bounded time, the launcher reports the failure, and ``checkpoint.resume=auto`` continues as if
nothing had happened.

* Rank 1 SIGKILLed in the middle of a step (after the checkpoint of step 2): torchrun ends rank 0
  and exits non-zero naming rank 1's SIGKILL, every process of the run is gone within the bound,
  and a resumed run's metrics equal an uninterrupted run's from the newest complete checkpoint.
* Rank 1 stopped (SIGSTOP: alive, answering nothing): rank 0 gives up after
  ``parallel.collective_timeout_minutes`` with one line (exit 3), and torchrun ends rank 1.

The Slurm side (a two-task job whose rank is SIGKILLed requeues itself and resumes):
tests/integration/test_slurm_launchers.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megacredit.utils.spawn import find_free_port
from process_helpers import kill_pids, session_pids
from trainer_helpers import read_losses, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HERE = Path(__file__).resolve().parent
STEPS = 4
TIMEOUT_MINUTES = 2.0
"""parallel.collective_timeout_minutes of these runs (rank 0's tiny rollouts take seconds; a loaded
2-core machine can stretch a phase rank 0 runs alone to a minute)."""
TORCHRUN_GRACE_S = 30
"""torchrun's SIGTERM-to-SIGKILL wait when it stops the workers of a failed run."""
RUN_TIMEOUT_S = 1200
COMPARED = ("train/loss", "train/grad_norm", "teacher/s_t", "rollout/reward_mean")


def _torchrun(run_dir: Path) -> subprocess.Popen:
    """``megacredit train`` under torchrun in its own session; its output goes to ``run_dir``.log
    (a file, not a pipe: a process that outlives the run cannot hold the test's reads)."""
    config = run_dir.parent / "empty.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides("credit", run_dir, steps=STEPS, **{
        "parallel.tensor_model_parallel_size": 2, "checkpoint.save_every": 1, "checkpoint.resume": "auto",
        "checkpoint.keep_last": 0, "parallel.collective_timeout_minutes": TIMEOUT_MINUTES})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(find_free_port()), "-m", "megacredit.cli", "train", str(config), *overrides]
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = run_dir.parent / f"{run_dir.name}.{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log
    return process


def _output(process: subprocess.Popen) -> str:
    return process.log.read_text(errors="replace")


def _finish(process: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> str:
    """The run's output; on timeout (or any failure here) every process of its session is killed by PID."""
    try:
        process.wait(timeout=timeout)
        return _output(process)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"torchrun did not end within {timeout} s: {_output(process)[-3000:]}") from None
    finally:
        kill_pids(session_pids(process.pid))
        process.wait()


def _rank_pid(torchrun: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "megacredit.cli" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank} under torchrun {torchrun.pid}")


def _wait_until(condition, process: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"torchrun ended before {what}: {_output(process)[-3000:]}"
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.1)


def _command_lines(pids: list[int]) -> list[str]:
    lines = []
    for pid in pids:
        try:
            lines.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ').decode()[:200]}")
        except OSError:
            continue
    return lines


def _assert_all_gone_within(process: subprocess.Popen, since: float, bound: float) -> str:
    """torchrun and every process of its session gone within ``bound`` seconds of ``since``."""
    session = process.pid
    try:
        process.wait(timeout=max(1.0, since + bound - time.monotonic()))
    except subprocess.TimeoutExpired:
        left = _command_lines(session_pids(session))
        _finish(process, timeout=1)
        raise AssertionError(f"torchrun still running {bound} s after the fault; its processes: {left}; "
                             f"output: {_output(process)[-3000:]}") from None
    deadline = since + bound
    while session_pids(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_pids(session)
    lines = _command_lines(left)
    kill_pids(left)
    assert not left, f"processes outlived the run by more than {bound} s: {lines}"
    return _output(process)


@pytest.mark.timeout(3600)  # three two-process runs: minutes each on a loaded 2-core machine
def test_a_rank_killed_mid_step_ends_the_run_and_a_resume_equals_an_uninterrupted_run(tmp_path):
    from megacredit.megatron.checkpoint import find_latest_checkpoint

    reference = _torchrun(tmp_path / "reference")
    output = _finish(reference)
    assert reference.returncode == 0, output[-3000:]
    run_dir = tmp_path / "killed"
    checkpoints = run_dir / "checkpoints"
    killed = _torchrun(run_dir)
    try:
        _wait_until(lambda: find_latest_checkpoint(checkpoints, warn=False) == checkpoints / "step_000002", killed,
                    "the checkpoint of step 2")
        os.kill(_rank_pid(killed, 1), signal.SIGKILL)
        killed_at = time.monotonic()
    except BaseException:
        _finish(killed, timeout=1)
        raise
    output = _assert_all_gone_within(killed, killed_at, TORCHRUN_GRACE_S + 60)
    assert killed.returncode != 0
    assert "exitcode  : -9" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    newest = find_latest_checkpoint(checkpoints, warn=False)
    resumed_from = int(newest.name.split("_")[1])
    assert 2 <= resumed_from < STEPS, "the kill should land before the last step"

    resumed = _torchrun(run_dir)
    output = _finish(resumed)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resuming from {newest} (step {resumed_from})" in output, output[-3000:]
    expected, got = read_losses(tmp_path / "reference"), read_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(resumed_from + 1, STEPS + 1):
        for name in COMPARED:
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-9), (step, name)


@pytest.mark.timeout(1800)
def test_a_hung_rank_stops_the_others_after_the_collective_timeout_with_one_line(tmp_path):
    run_dir = tmp_path / "hung"
    run = _torchrun(run_dir)
    try:
        _wait_until(lambda: (run_dir / "metrics.jsonl").exists() and 1 in read_losses(run_dir), run, "step 1")
        os.kill(_rank_pid(run, 1), signal.SIGSTOP)
        stopped_at = time.monotonic()
    except BaseException:
        _finish(run, timeout=1)
        raise
    output = _assert_all_gone_within(run, stopped_at, TIMEOUT_MINUTES * 60 + TORCHRUN_GRACE_S + 90)
    assert run.returncode != 0
    errors = [line for line in output.splitlines() if "megacredit: error:" in line]
    assert len(errors) == 1, output[-3000:]
    assert "rank 0: a collective failed" in errors[0] and f"parallel.collective_timeout_minutes={TIMEOUT_MINUTES:g}" in errors[0], errors
    assert "exitcode  : 3" in output, output[-3000:]  # torchrun names rank 0's fault status
