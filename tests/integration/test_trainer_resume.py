"""Preemption and resume: SIGTERM mid-run saves a checkpoint; ``resume=auto`` continues it and the
following steps equal an uninterrupted run's (fp32, same seed). A validation due at the step the
signal stopped is not run then (the save comes first); it runs when the run resumes, with the
same result as the uninterrupted run's. A signal that arrives during that validation lets it end
(it is logged once, not run again on resume).

The signal is the real SIGTERM through the real handler; the environment (trainer_helpers
SignalledParityEnv) sends it to its own process at a named point, because one sent from the test
after step 1 is logged races step 2 (on a fast machine step 2 ends before it arrives)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_helpers import read_losses, tiny_overrides

pytestmark = pytest.mark.integration
HELPERS_DIR = Path(__file__).parent


def _command(run_dir: Path, config: Path, **extra) -> list[str]:
    overrides = tiny_overrides("credit", run_dir, steps=4, **{"checkpoint.resume": "auto",
                                                               "env.name": "trainer_helpers:SignalledParityEnv",
                                                               "validation.every_steps": 2, **extra})
    return [sys.executable, "-m", "megacredit.cli", "train", str(config), *overrides]


def _env(sigterm_at: str = "") -> dict:
    """The subprocess environment; ``sigterm_at`` ("train:2", "val:1"): where the run signals itself."""
    env = {**os.environ, "PYTHONPATH": f"{HELPERS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MEGACREDIT_TEST_SIGTERM_AT", None)
    return {**env, "MEGACREDIT_TEST_SIGTERM_AT": sigterm_at} if sigterm_at else env


def _validations(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val/avg_at_k" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, list[dict]]:
    """The uninterrupted run: its training metrics per step and its validations."""
    run_dir = tmp_path_factory.mktemp("reference")
    config = run_dir / "empty.yaml"
    config.write_text("{}\n")
    subprocess.run(_command(run_dir / "run", config), env=_env(), check=True, capture_output=True, timeout=600)
    return read_losses(run_dir / "run"), _validations(run_dir / "run")


@pytest.mark.parametrize("sigterm_at, validation_pending", [("train:2", True), ("val:1", False)],
                         ids=["during-step-2-rollouts", "during-step-2-validation"])
def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path, reference, sigterm_at, validation_pending):
    reference_losses, reference_validations = reference
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    run_dir = tmp_path / "resumed"
    interrupted = subprocess.run(_command(run_dir, config), env=_env(sigterm_at), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, timeout=600)
    output = interrupted.stdout.decode()
    assert interrupted.returncode == 0, output[-3000:]
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [int(p.name.split("_")[1]) for p in checkpoints] == [2], "SIGTERM in step 2 saves step 2 and stops"
    assert sorted(read_losses(run_dir)) == [1, 2]
    assert ("preempted: its validation runs first on resume" in output) == validation_pending, output[-3000:]
    assert [r["step"] for r in _validations(run_dir)] == ([] if validation_pending else [2])

    subprocess.run(_command(run_dir, config), env=_env(), check=True, capture_output=True, timeout=600)
    resumed = read_losses(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    validations = _validations(run_dir)
    assert [r["step"] for r in validations] == [2], "step 2's validation: once, run on resume if it was skipped"
    assert validations[0]["val/avg_at_k"] == pytest.approx(reference_validations[0]["val/avg_at_k"], abs=1e-12)
    for step in range(1, 5):
        for name in ("train/loss", "train/grad_norm", "rollout/reward_mean", "teacher/s_t"):
            assert resumed[step][name] == pytest.approx(reference_losses[step][name], rel=1e-6, abs=1e-9), (step, name)
