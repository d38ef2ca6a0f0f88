"""Preemption and resume: SIGTERM mid-run saves a checkpoint; ``resume=auto`` continues it and the
following steps equal an uninterrupted run's (fp32, same seed)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_helpers import read_losses, tiny_overrides

pytestmark = pytest.mark.integration
HELPERS_DIR = Path(__file__).parent


def _command(run_dir: Path, config: Path, **extra) -> list[str]:
    overrides = tiny_overrides("credit", run_dir, steps=4, **{"checkpoint.resume": "auto", **extra})
    return [sys.executable, "-m", "megacredit.cli", "train", str(config), *overrides]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{HELPERS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and step in read_losses(run_dir):
            return
        assert process.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not logged within {timeout}s")


def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run(_command(reference_dir, config), env=_env(), check=True, capture_output=True, timeout=600)
    reference = read_losses(reference_dir)

    process = subprocess.Popen(_command(resumed_dir, config), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    _wait_for_step(resumed_dir, 1, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output.decode()[-3000:]
    checkpoints = sorted((resumed_dir / "checkpoints").glob("step_*"))
    assert checkpoints and not any(p.name.endswith(".tmp") for p in checkpoints)
    interrupted_at = int(checkpoints[-1].name.split("_")[1])
    assert 1 <= interrupted_at < 4, "SIGTERM should stop the run before its last step"

    subprocess.run(_command(resumed_dir, config), env=_env(), check=True, capture_output=True, timeout=600)
    resumed = read_losses(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in range(1, 5):
        for name in ("train/loss", "train/grad_norm", "rollout/reward_mean", "teacher/s_t"):
            assert resumed[step][name] == pytest.approx(reference[step][name], rel=1e-6, abs=1e-9), (step, name)
