"""The launchers for real: ``sbatch`` of slurm/credit_8b.sh and NeMo-Run's executors, on a one-node
Slurm cluster (slurmctld + slurmd + slurmdbd + MariaDB, free ports) brought up for this module.

The tiny CPU config (examples/tiny_cpu_arithmetic.yaml) replaces the 8B one on the command line;
the sbatch options override the script's GPU header (no GPUs, 2 tasks); TP=2 over the 2 ranks.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from make_deps import missing, needs
from megacredit.utils.spawn import find_free_port
from slurm_cluster import LocalSlurmCluster, unavailable_reason
from trainer_helpers import read_losses

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny_cpu_arithmetic.yaml"
STEPS = 4
COMPARED = ("train/loss", "train/grad_norm", "teacher/s_t", "teacher/topk_kl", "rollout/reward_mean")


def _env(base: dict[str, str], tmp: Path) -> dict[str, str]:
    """The project's Python first on PATH (the scripts call `python`, NeMo-Run `torchrun`)."""
    env = {k: v for k, v in base.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(NEMORUN_HOME=str(tmp / "nemo"), LOG_ROOT=str(tmp / "logs"), RUN_ROOT=str(tmp / "runs"))
    return env


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run to the end; on timeout kill the whole process group this started (torchrun workers too)."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{command[:4]} timed out after {timeout}s:\n{output[-4000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, output, "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason is not None:
        missing("slurm", reason)
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as local_cluster:
        yield local_cluster


def _sbatch(cluster: LocalSlurmCluster, tmp: Path, *extra: str, wait: bool = True) -> str:
    """Submit slurm/credit_8b.sh with the tiny CPU config on 2 tasks, TP=2; returns the job id."""
    command = ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--time=30",
               *(["--wait"] if wait else []), str(ROOT / "slurm" / "credit_8b.sh"), str(TINY),
               "parallel.tensor_model_parallel_size=2", f"training.steps={STEPS}", "logging.console=false", *extra]
    env = {**_env(cluster.env, tmp), "MASTER_PORT": str(find_free_port())}
    result = _run(command, env, tmp, timeout=900)
    job_id = result.stdout.strip().splitlines()[0].split(";")[0] if result.stdout.strip() else ""
    assert not wait or result.returncode == 0, f"sbatch --wait exited {result.returncode}: {result.stdout}\n" \
        f"{_job_output(tmp)}"
    return job_id


def _job_output(tmp: Path) -> str:
    texts = [p.read_text(errors="replace")[-3000:] for p in sorted(tmp.glob("slurm-*.out"))]
    texts += [p.read_text(errors="replace")[-3000:] for p in sorted((tmp / "logs").glob("*/train.*.log"))]
    return "\n".join(texts)


def _job_dirs(tmp: Path, job_id: str) -> tuple[Path, Path]:
    return tmp / "logs" / f"megacredit-credit-8b-{job_id}", tmp / "runs" / f"megacredit-credit-8b-{job_id}"


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """One uninterrupted sbatch run: (job id, its tmp dir)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return _sbatch(cluster, tmp), tmp


def test_sbatch_credit_8b_with_tiny_cpu_overrides_trains_and_logs(cluster, uninterrupted):
    job_id, tmp = uninterrupted
    log_dir, run_dir = _job_dirs(tmp, job_id)
    assert sorted(read_losses(run_dir)) == list(range(1, STEPS + 1)), _job_output(tmp)
    assert cluster.accounting_states(job_id) == ["COMPLETED"]
    assert (log_dir / "config.yaml").read_text().startswith("# layout: 2 ranks = TP 2 x PP 1 x DP 1")
    assert (log_dir / "train.restart0.log").exists()
    steps = cluster.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobName,NTasks,State"]).stdout.split()
    assert "python|1|COMPLETED" in steps and "python|2|COMPLETED" in steps, steps  # preflight, trainer
    batch = next(tmp.glob(f"slurm-megacredit-credit-8b-{job_id}.out")).read_text()
    assert "rollout: colocated" in batch and "trainer exited with status 0" in batch


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_pre_timeout_signal_checkpoints_requeues_and_resumes_to_the_same_metrics(cluster, uninterrupted,
                                                                               tmp_path):
    reference_id, reference_tmp = uninterrupted
    reference = read_losses(_job_dirs(reference_tmp, reference_id)[1])
    job_id = _sbatch(cluster, tmp_path, wait=False)
    log_dir, run_dir = _job_dirs(tmp_path, job_id)
    metrics = run_dir / "metrics.jsonl"
    _wait_until(lambda: metrics.exists() and 1 in read_losses(run_dir), 600, "step 1 of the job")
    # What --signal=B:USR1@600 does ten minutes before the time limit: USR1 to the batch shell.
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    _wait_until(lambda: cluster.accounting_states(job_id)[-1:] == ["COMPLETED"]
                or cluster.accounting_states(job_id)[-1:] == ["FAILED"], 900, "the requeued run to end")
    assert cluster.accounting_states(job_id) == ["REQUEUED", "COMPLETED"], _job_output(tmp_path)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and not checkpoints[0].endswith(".tmp")
    interrupted_at = int(checkpoints[0].split("_")[1])
    assert 1 <= interrupted_at < STEPS, "USR1 should stop the first run before its last step"
    resumed_log = (log_dir / "train.restart1.log").read_text()
    assert (log_dir / "train.restart0.log").exists() and resumed_log
    resumed = read_losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1)), "each step logged once, counter continued"
    for step in range(1, STEPS + 1):
        for name in COMPARED:
            assert resumed[step][name] == pytest.approx(reference[step][name], rel=1e-6, abs=1e-9), (step, name)


nemo = needs("nemo_run", importlib.util.find_spec("nemo_run") is not None)


def _recipe(executor: str, tmp: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megacredit.recipes.tiny_cpu", "--executor", executor, "--ntasks", "2",
               "--tensor-parallel", "2", "--steps", "2", "--run-dir", str(tmp / "run"), *extra,
               "logging.console=false"]
    return _run(command, env, tmp, timeout=900)


@nemo
def test_nemo_run_local_executor_torchrun_two_processes_succeeds(tmp_path):
    result = _recipe("local", tmp_path, _env(dict(os.environ), tmp_path))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "finished: SUCCEEDED" in result.stdout
    assert sorted(read_losses(tmp_path / "run")) == [1, 2]  # TP=2 cannot start on fewer than 2 ranks


@nemo
def test_nemo_run_slurm_executor_local_tunnel_succeeds(cluster, tmp_path):
    result = _recipe("slurm", tmp_path, _env(cluster.env, tmp_path), "--account", "root", "--gpus-per-node", "0",
                     "--time", "00:30:00", "--master-port", str(find_free_port()))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "finished: SUCCEEDED" in result.stdout
    assert sorted(read_losses(tmp_path / "run")) == [1, 2]
