"""Reading the launcher's environment: torchrun, Slurm, single process; layout validation."""

import pytest

from megacredit.megatron.distributed import _first_slurm_host, _validate_layout, read_launch_env


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 8, 1, "torchrun")
    assert (launch.master_addr, launch.master_port) == ("n0", 1234)


def test_slurm_variables_pick_first_node_as_master():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_NODELIST": "gpu[07-08,11]"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 16, 5, "slurm")
    assert launch.master_addr == "gpu07"


def test_torchrun_wins_inside_slurm_allocation():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert read_launch_env(env).launcher == "torchrun"


def test_single_process_default():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("a[3-5]", "a3"), ("h[01,04],x", "h01"), ("n1,n2", "n1")])
def test_slurm_nodelist_parsing(nodelist, host):
    assert _first_slurm_host(nodelist) == host


def test_layout_must_divide_world():
    _validate_layout(8, 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        _validate_layout(6, 2, 2)
    with pytest.raises(ValueError, match=">= 1"):
        _validate_layout(2, 0, 1)
