"""Submitting slurm/credit_8b.sh with the tiny CPU config to a local test cluster, and reading
what its jobs left (shared by the one-node and the two-node Slurm tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from megacredit.utils.spawn import find_free_port
from slurm_cluster import LocalSlurmCluster

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny_cpu_arithmetic.yaml"
JOB_NAME = "megacredit-credit-8b"


def job_env(base: dict[str, str], tmp: Path) -> dict[str, str]:
    """The project's Python first on PATH (the scripts call `python`, NeMo-Run `torchrun`)."""
    env = {k: v for k, v in base.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(NEMORUN_HOME=str(tmp / "nemo"), LOG_ROOT=str(tmp / "logs"), RUN_ROOT=str(tmp / "runs"))
    return env


def run_to_end(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run to the end; on timeout or interruption kill the whole process group this started
    (torchrun workers too)."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{command[:4]} timed out after {timeout}s:\n{output[-4000:]}") from None
    except BaseException:  # an interrupted test run (Ctrl-C) leaves no `sbatch --wait` behind
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def sbatch_tiny(cluster: LocalSlurmCluster, tmp: Path, options: Sequence[str], overrides: Sequence[str],
                wait: bool = True, env: dict[str, str] | None = None) -> str:
    """Submit slurm/credit_8b.sh with the tiny CPU config (sbatch ``options`` beside the header's,
    no GPUs, key=value ``overrides``) from ``tmp``; returns the job id."""
    command = ["sbatch", "--parsable", "--gpus-per-node=0", "--time=30", *options, *(["--wait"] if wait else []),
               str(ROOT / "slurm" / "credit_8b.sh"), str(TINY), "logging.console=false", *overrides]
    env = {**job_env(cluster.env, tmp), "MASTER_PORT": str(find_free_port()), **(env or {})}
    result = run_to_end(command, env, tmp, timeout=900)
    job_id = result.stdout.strip().splitlines()[0].split(";")[0] if result.stdout.strip() else ""
    assert not wait or result.returncode == 0, f"sbatch --wait exited {result.returncode}: {result.stdout}\n" \
        f"{job_output(tmp)}"
    return job_id


def job_output(tmp: Path) -> str:
    """The tails of the batch output and the trainer logs of the jobs submitted from ``tmp``."""
    texts = [p.read_text(errors="replace")[-3000:] for p in sorted(tmp.glob("slurm-*.out"))]
    texts += [p.read_text(errors="replace")[-3000:] for p in sorted((tmp / "logs").glob("*/*.log"))]
    return "\n".join(texts)


def job_dirs(tmp: Path, job_id: str) -> tuple[Path, Path]:
    """The job's log directory and run directory (slurm/launch.sh's LOG_ROOT / RUN_ROOT layout)."""
    return tmp / "logs" / f"{JOB_NAME}-{job_id}", tmp / "runs" / f"{JOB_NAME}-{job_id}"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")
