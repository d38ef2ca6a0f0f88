"""The launchers for real: ``sbatch`` of slurm/credit_8b.sh and NeMo-Run's executors, on a one-node
Slurm cluster (slurmctld + slurmd + slurmdbd + MariaDB, free ports) brought up for this module;
a job requeues itself after USR1 (the time limit) and after a rank was SIGKILLed, and resumes.

The tiny CPU config (examples/tiny_cpu_arithmetic.yaml) replaces the 8B one on the command line;
the sbatch options override the script's GPU header (no GPUs, 2 tasks); TP=2 over the 2 ranks.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from make_deps import missing, needs
from megacredit.utils.spawn import find_free_port
from slurm_cluster import LocalSlurmCluster, unavailable_reason
from slurm_jobs import job_dirs, job_env, job_output, run_to_end, sbatch_tiny, wait_until
from trainer_helpers import read_losses

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 4
COMPARED = ("train/loss", "train/grad_norm", "teacher/s_t", "teacher/topk_kl", "rollout/reward_mean")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason is not None:
        missing("slurm", reason)
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as local_cluster:
        yield local_cluster


def _sbatch(cluster: LocalSlurmCluster, tmp: Path, *overrides: str, wait: bool = True) -> str:
    """Submit slurm/credit_8b.sh with the tiny CPU config (plus ``overrides``) on 2 tasks, TP=2;
    returns the job id."""
    return sbatch_tiny(cluster, tmp, ["--ntasks-per-node=2"],
                       ["parallel.tensor_model_parallel_size=2", f"training.steps={STEPS}", *overrides], wait=wait)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """One uninterrupted sbatch run: (job id, its tmp dir)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return _sbatch(cluster, tmp), tmp


def test_sbatch_credit_8b_with_tiny_cpu_overrides_trains_and_logs(cluster, uninterrupted):
    job_id, tmp = uninterrupted
    log_dir, run_dir = job_dirs(tmp, job_id)
    assert sorted(read_losses(run_dir)) == list(range(1, STEPS + 1)), job_output(tmp)
    assert cluster.accounting_states(job_id) == ["COMPLETED"]
    assert (log_dir / "config.yaml").read_text().startswith("# layout: 2 ranks = TP 2 x PP 1 x DP 1")
    assert (log_dir / "train.restart0.log").exists()
    steps = cluster.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobName,NTasks,State"]).stdout.split()
    assert "python|1|COMPLETED" in steps and "python|2|COMPLETED" in steps, steps  # preflight, trainer
    batch = next(tmp.glob(f"slurm-megacredit-credit-8b-{job_id}.out")).read_text()
    assert "rollout: colocated" in batch and "trainer exited with status 0" in batch


def test_pre_timeout_signal_checkpoints_requeues_and_resumes_to_the_same_metrics(cluster, uninterrupted,
                                                                               tmp_path):
    reference_id, reference_tmp = uninterrupted
    reference = read_losses(job_dirs(reference_tmp, reference_id)[1])
    job_id = _sbatch(cluster, tmp_path, wait=False)
    log_dir, run_dir = job_dirs(tmp_path, job_id)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and 1 in read_losses(run_dir), 600, "step 1 of the job")
    # What --signal=B:USR1@600 does ten minutes before the time limit: USR1 to the batch shell.
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    wait_until(lambda: cluster.accounting_states(job_id)[-1:] == ["COMPLETED"]
                or cluster.accounting_states(job_id)[-1:] == ["FAILED"], 900, "the requeued run to end")
    assert cluster.accounting_states(job_id) == ["REQUEUED", "COMPLETED"], job_output(tmp_path)
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


def _trainer_pid(job_id: str, rank: int, run_dir: Path) -> int | None:
    """PID of the job's trainer process of ``rank``, or None: found by its Slurm environment AND
    this test's run directory on its command line (other Slurm test clusters on the machine
    number their jobs from 1 too: a job id alone can name another cluster's process)."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            if cmdline[1:4] == [b"-m", b"megacredit.cli", b"train"] and \
                    f"logging.run_dir={run_dir}".encode() in cmdline and \
                    wanted <= set((entry / "environ").read_bytes().split(b"\0")):
                return int(entry.name)
        except OSError:
            continue
    return None


@pytest.mark.timeout(3000)
def test_a_rank_killed_mid_step_requeues_the_job_which_resumes_to_the_same_metrics(cluster, uninterrupted,
                                                                                 tmp_path):
    """SIGKILL to rank 1 (the OOM killer, a lost node): srun --kill-on-bad-exit stops rank 0 within
    Slurm's KillWait (30 s here), the batch script sees status 137 or 143 and requeues the job, which
    resumes from the newest complete checkpoint to the metrics of the uninterrupted run."""
    from megacredit.megatron.checkpoint import find_latest_checkpoint

    reference_id, reference_tmp = uninterrupted
    reference = read_losses(job_dirs(reference_tmp, reference_id)[1])
    job_id = _sbatch(cluster, tmp_path, "checkpoint.save_every=1", "parallel.collective_timeout_minutes=1", wait=False)
    log_dir, run_dir = job_dirs(tmp_path, job_id)
    checkpoints = run_dir / "checkpoints"
    wait_until(lambda: find_latest_checkpoint(checkpoints, warn=False) is not None, 900, "the first checkpoint")
    survivor, victim = _trainer_pid(job_id, 0, run_dir), _trainer_pid(job_id, 1, run_dir)
    assert survivor and victim, job_output(tmp_path)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{survivor}").exists(), 90, "rank 0 to stop after rank 1 was killed")
    wait_until(lambda: cluster.accounting_states(job_id)[-1:] in (["COMPLETED"], ["FAILED"]), 1200,
                "the requeued run to end")
    assert cluster.accounting_states(job_id) == ["REQUEUED", "COMPLETED"], job_output(tmp_path)
    batch = next(tmp_path.glob(f"slurm-megacredit-credit-8b-{job_id}.out")).read_text()
    # srun returns 128 + the signal that ended a task: 137 (rank 1's SIGKILL) or 143 (the SIGTERM
    # with which Slurm ends rank 0), whichever it reports; both requeue
    assert re.search(r"trainer exited with status 1(37|43)\n", batch) and "requeueing job" in batch, batch
    assert "resuming from" in (log_dir / "train.restart1.log").read_text()
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
    return run_to_end(command, env, tmp, timeout=900)


@nemo
def test_nemo_run_local_executor_torchrun_two_processes_succeeds(tmp_path):
    result = _recipe("local", tmp_path, job_env(dict(os.environ), tmp_path))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "finished: SUCCEEDED" in result.stdout
    assert sorted(read_losses(tmp_path / "run")) == [1, 2]  # TP=2 cannot start on fewer than 2 ranks


@nemo
def test_nemo_run_slurm_executor_local_tunnel_succeeds(cluster, tmp_path):
    result = _recipe("slurm", tmp_path, job_env(cluster.env, tmp_path), "--account", "root", "--gpus-per-node", "0",
                     "--time", "00:30:00", "--master-port", str(find_free_port()))
    assert result.returncode == 0, result.stdout[-4000:]
    assert "finished: SUCCEEDED" in result.stdout
    assert sorted(read_losses(tmp_path / "run")) == [1, 2]
