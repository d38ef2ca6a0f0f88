"""A real short training run shows its progress: plain lines in a log, rich bars on a terminal.

The CLI runs a 1-step CREDIT job on the tiny model (validation before training included):
* through a pipe (not a terminal: CI, Slurm logs) with 2 data-parallel processes under torchrun:
  plain lines for the start-up stages, rollout / validation samples and each pass's
  micro-batches, printed by the logging rank only (each closing line appears once, not twice);
* in a pseudo-terminal (one process): rich's live bars, with the same phase names.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_helpers import tiny_overrides

pytestmark = pytest.mark.integration
HELPERS_DIR = Path(__file__).parent
PHASES = ("validation", "rollout", "old-policy pass", "teacher+contrastive pass", "train pass")


def _overrides(run_dir: Path, **extra) -> list[str]:
    return tiny_overrides("credit", run_dir, steps=1, **{
        "validation.before_training": True, "validation.k": 2, "logging.console": True, **extra})


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{HELPERS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "COLUMNS": "140", "TERM": "xterm-256color"}


def _run_process_group(command: list[str], timeout: float) -> tuple[int, str]:
    """Run ``command`` in its own process group (torchrun and its workers), output piped; the
    whole group is killed if it outlives ``timeout`` or the test fails."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    finally:
        if process.poll() is None or _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_plain_progress_lines_in_a_log_from_the_logging_rank_only(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "megacredit.cli", "train", str(config),
               *_overrides(tmp_path / "run", **{"logging.progress_interval_s": 0})]
    returncode, output = _run_process_group(command, timeout=600)
    assert returncode == 0, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("megacredit: ")]
    assert "\x1b[" not in "\n".join(lines), "plain mode must not write terminal control sequences"
    for stage in ("loading the model tiny", "building the Megatron model", "building the embedded rollout engine"):
        assert sum(line.startswith(f"megacredit: {stage}") and " done in " in line for line in lines) == 1, stage
    # which layer spec, and why (no Transformer Engine on this machine)
    assert any(line.startswith("megacredit: building the Megatron model (Megatron-Core local layer spec: "
                               "model.transformer_engine=auto, Transformer Engine cannot load (") for line in lines)
    closing = [line for line in lines if "(100 %)" in line]
    # 4 prompts x G=2 samples; validation 4 prompts x k=2; 2 PPO mini-batches -> 2 train passes.
    assert sum(line.startswith("megacredit: rollout: 8/8 samples") for line in closing) == 1, closing
    assert sum(line.startswith("megacredit: validation: 8/8 samples") for line in closing) == 1, closing
    for phase in ("old-policy pass", "teacher+contrastive pass"):
        assert sum(line.startswith(f"megacredit: {phase}: ") for line in closing) == 1, (phase, closing)
    assert sum(line.startswith("megacredit: train pass: ") for line in closing) == 2, closing
    assert re.search(r"megacredit: teacher\+contrastive pass: \d+/\d+ micro-batches", output)


def _read_pty(command: list[str], timeout: float) -> tuple[int, str]:
    master, slave = pty.openpty()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=_env(),
                               start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        os.close(master)
    return returncode, b"".join(chunks).decode("utf-8", "replace")


def test_rich_progress_bars_on_a_terminal(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    command = [sys.executable, "-m", "megacredit.cli", "train", str(config), *_overrides(tmp_path / "run")]
    returncode, output = _read_pty(command, timeout=600)
    assert returncode == 0, output[-3000:]
    assert "\x1b[" in output and "━" in output, "no live progress bars on the terminal"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    for phase in PHASES:
        assert re.search(rf"{re.escape(phase)} .*\d+/\d+ (samples|micro-batches)", text), phase
    assert "done loading the model tiny in" in text
    assert "megacredit: " not in text, "a terminal gets bars, not the plain lines"
