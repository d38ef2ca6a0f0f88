"""Preemption and resume: SIGTERM mid-run saves a checkpoint; ``resume=auto`` continues it and the
following steps equal an uninterrupted run's (fp32, same seed). A validation due at the step the
signal stopped is not run then (the save comes first); it runs when the run resumes, with the
same result as the uninterrupted run's."""

import json

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
    overrides = tiny_overrides("credit", run_dir, steps=4, **{"checkpoint.resume": "auto",
                                                               "validation.every_steps": 2, **extra})
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


def _validations(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val/avg_at_k" in r]


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
    skipped = "preempted: its validation runs first on resume" in output.decode()
    assert skipped == (interrupted_at == 2), output.decode()[-3000:]  # step 2's validation was due
    assert [r["step"] for r in _validations(resumed_dir)] == ([] if interrupted_at <= 2 else [2])

    subprocess.run(_command(resumed_dir, config), env=_env(), check=True, capture_output=True, timeout=600)
    resumed = read_losses(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    validations = _validations(resumed_dir)
    assert [r["step"] for r in validations] == [2], "step 2's validation: once, run on resume if it was skipped"
    assert validations[0]["val/avg_at_k"] == pytest.approx(_validations(reference_dir)[0]["val/avg_at_k"], abs=1e-12)
    for step in range(1, 5):
        for name in ("train/loss", "train/grad_norm", "rollout/reward_mean", "teacher/s_t"):
            assert resumed[step][name] == pytest.approx(reference[step][name], rel=1e-6, abs=1e-9), (step, name)
