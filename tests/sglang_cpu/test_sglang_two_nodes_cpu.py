"""slurm/launch.sh's remote placement with SGLang across two Slurm nodes: an SGLang-CPU server
(``python -m sglang.launch_server`` of this environment, given to the launcher as
ROLLOUT_PYTHON) on node2, the trainer on node1 (the launcher's own runtime), each node a network
namespace on a private bridge (tests/integration/slurm_netns.py), so they reach each other only
through the bridge, as two machines would.

The tiny random Llama of the vLLM two-node test (float32 on both sides, context 512), two
training steps with the sync check on every sync. The weights go by
``update_weights_from_distributed`` over a gloo group whose master is the trainer: the server's
log must show it joining at node1's bridge address (not 127.0.0.1, which on node2 is node2
itself), and the probe's log-probs after each sync must equal the trainer's within 1e-3
(float32 on both sides, the tolerance of the other SGLang tests, docs/testing.md; measured
1e-7 to 3e-7, and 2e-6 between the rollout's log-probs and the trainer's). About 3 minutes here, 100 s
of it the server's start.
SGLANG_DISABLED_MODEL_ARCHS (conftest.py) reaches the server through the job's environment
(sbatch passes the submitter's).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from engine_scenarios import training_steps_with_sync_and_mismatch
from slurm_jobs import job_dirs, sbatch_tiny
from slurm_netns import two_node_cluster
from vllm_helpers import write_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("slurm2")) as two_nodes:
        yield two_nodes


def _server_environment() -> dict[str, str]:
    """The launcher's knobs for one SGLang-CPU server per rollout node; one OpenMP thread for the
    server and the trainer (both share this machine's 2 cores)."""
    from megacredit.rollout.sglang import server_args_with_defaults, sglang_environment
    from megacredit.rollout.sglang_server import cli_flags

    flags = cli_flags(server_args_with_defaults({"dtype": "float32", "context_length": 512, "random_seed": 0}))
    return sglang_environment({"ROLLOUT_PLACEMENT": "remote", "ROLLOUT_ENGINE": "sglang", "ROLLOUT_PORT": "8000",
                               "ROLLOUT_PYTHON": sys.executable, "ROLLOUT_STARTUP_TIMEOUT": "800",
                               "ROLLOUT_SERVER_ARGS": " ".join(flags), "OMP_NUM_THREADS": "1"})


def test_remote_sglang_server_on_node2_and_trainer_on_node1(cluster, tmp_path: Path):
    model = write_tiny_model(tmp_path / "model")
    job_id = sbatch_tiny(cluster, tmp_path, ["--nodes=2", "--ntasks-per-node=1"], [
        f"model.name_or_path={model}", "training.steps=2", "rollout.check_weight_sync_every=1"],
        env=_server_environment())
    batch = next(tmp_path.glob(f"slurm-*-{job_id}.out")).read_text()
    assert "trainer: 1 ranks on [node1]" in batch and "rollout: remote sglang servers on [node2] port 8000" in batch
    assert f"rollout server on node2: {sys.executable} -m sglang.launch_server" in batch, batch
    assert "rollout servers healthy" in batch and "trainer exited with status 0" in batch, batch
    log_dir, run_dir = job_dirs(tmp_path, job_id)
    assert "  urls:\n  - http://node2:8000\n" in (log_dir / "config.yaml").read_text()
    server_log = (log_dir / "rollout-node2.log").read_text(errors="replace")
    masters = set(re.findall(r"init custom process group: master_address=([^,]+),", server_log))
    assert masters == {cluster.addresses["node1"]}, server_log[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training_steps_with_sync_and_mismatch(records, TOLERANCE)
