"""One share of the node's cores per local rank (megacredit/utils/cpu_threads.py)."""

import os
import subprocess
import sys

import pytest

from megacredit.utils.cpu_threads import local_ranks, threads_per_rank


@pytest.mark.parametrize("env, expected", [
    ({}, 1),
    ({"LOCAL_WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "8"}, 4),  # torchrun wins
    ({"SLURM_PROCID": "1", "SLURM_TASKS_PER_NODE": "2"}, 2),
    ({"SLURM_PROCID": "5", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"SLURM_PROCID": "2", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "1"}, 2),
    ({"SLURM_PROCID": "2", "SLURM_STEP_TASKS_PER_NODE": "3", "SLURM_TASKS_PER_NODE": "8"}, 3),
    ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "garbage"}, 1),
])
def test_local_ranks_from_torchrun_or_slurm(env, expected):
    assert local_ranks(env) == expected


def test_threads_are_the_cores_divided_by_the_local_ranks():
    slurm_two = {"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "2"}
    assert threads_per_rank(slurm_two, usable_cores=16, node_cores=16) == 8
    assert threads_per_rank({**slurm_two, "SLURM_TASKS_PER_NODE": "3"}, 16, 16) == 5
    assert threads_per_rank({**slurm_two, "SLURM_TASKS_PER_NODE": "32"}, 16, 16) == 1  # never 0


def test_user_choice_single_rank_and_pinned_processes_are_left_alone():
    slurm_two = {"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "2"}
    assert threads_per_rank({**slurm_two, "OMP_NUM_THREADS": "3"}, 16, 16) is None
    assert threads_per_rank({}, 16, 16) is None
    assert threads_per_rank(slurm_two, usable_cores=4, node_cores=16) is None  # srun --cpu-bind


def test_the_limit_sets_torch_threads_under_srun_like_variables(tmp_path):
    """In a fresh process: two Slurm tasks on this node -> half the cores each, torch included."""
    probe = ("import sys, torch; from megacredit.utils.cpu_threads import limit_threads_per_local_rank;"
             "print(limit_threads_per_local_rank(), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    env.update(SLURM_PROCID="0", SLURM_TASKS_PER_NODE="2", SLURM_NODEID="0")
    usable = len(os.sched_getaffinity(0))
    if usable < (os.cpu_count() or usable):
        pytest.skip("this process is pinned to a subset of the cores; the limit is then left alone")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(max(1, usable // 2))] * 2
