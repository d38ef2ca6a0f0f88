"""The trainer's state released while the engine generates (``rollout.offload_trainer_during_rollout``).

1. Three CREDIT steps of the tiny model (embedded engine, a validation and a checkpoint at step
   2, the weight-sync probe scored at every sync) log exactly the metrics of the same run
   without the release, with the teacher on the device or in host memory: exact by design,
   the release and restore are byte copies (through a file on a CPU) and a host teacher on a CPU
   runs the same arithmetic.
2. After a step (before the weight sync) the gradients, the optimizer state and the teacher are
   released and the parameters are not; during the rollout all four are, every storage of the
   trainer's state is empty, and the bytes released equal an independent count from the
   parameter count n and the parameter tensors k: fp32 parameters 4n, DDP's fp32 gradient
   buffer 4n (no padding without the distributed optimizer), Adam's two moments 8n and one fp32
   step per tensor 4k, the teacher 4n. What the process's resident memory does meanwhile is
   machine-dependent and is measured in benchmarks/memory_knobs.py.
3. All the memory knobs at once at DP=2 (distributed optimizer, release, full recompute, teacher
   in host memory; 2 gloo processes) equal the single-process run within the tolerance of
   tests/integration/test_trainer_parallel.py (1e-4; rewards equal).
"""

import math
from pathlib import Path

import pytest

from megacredit.utils.spawn import run_distributed
from trainer_helpers import tiny_overrides, train_runs

pytestmark = [pytest.mark.integration, pytest.mark.distributed]
COMMON = {"validation.every_steps": 2, "validation.num_prompts": 2, "checkpoint.save_every": 2,
          "rollout.check_weight_sync_every": 1}
RELEASED = {"rollout.offload_trainer_during_rollout": True}
ALL_KNOBS = {**RELEASED, "optimizer.use_distributed_optimizer": True, "parallel.recompute": "full",
             "algorithm.teacher.offload_to_host": True}


def _state_during_rollout(run_dir: Path) -> dict:
    """One step of a released run, then the trainer's state inside the rollout's release."""
    from megacredit.config import load_config
    from megacredit.megatron.trainer_memory import part_tensors
    from megacredit.trainer.loop import setup
    from megacredit.trainer.rl_step import run_step, trainer_memory_released
    from megacredit.trainer.rollout import PromptStream
    from megacredit.trainer.weight_sync import sync_weights

    cfg = load_config(None, tiny_overrides("credit", run_dir, **RELEASED))
    run, train_records, _ = setup(cfg)
    sync_weights(run)
    prompts = PromptStream(train_records, cfg.data.prompts_per_step, cfg.training.seed, cfg.data.shuffle)
    run_step(run, 0, prompts.batch(0))  # Adam's moments exist from here on
    actor = run.actor
    after_step = sorted(actor.memory.released)
    parts = part_tensors(actor.model_chunks, actor.optimizer, actor.teacher)
    params = parts["parameters"]
    with trainer_memory_released(run):
        released = dict(actor.memory.released)
        empty = all(t.untyped_storage().nbytes() == 0 for tensors in parts.values() for t in tensors)
    resident = all(t.untyped_storage().nbytes() > 0 for tensors in parts.values() for t in tensors)
    metrics = run_step(run, 1, prompts.batch(1))
    return dict(after_step=after_step, released=released, empty=empty, resident=resident,
                numel=sum(p.numel() for p in params), tensors=len(params), next_loss=metrics["train/loss"])


def _single_process(rank, world_size, root):
    root = Path(root)
    runs = [(name, tiny_overrides("credit", root / name, **COMMON, **extra)) for name, extra in (
        ("reference", {}), ("released", RELEASED),
        ("released_teacher_on_host", {**RELEASED, "algorithm.teacher.offload_to_host": True}))]
    results = train_runs(rank, world_size, runs)
    results["during_rollout"] = _state_during_rollout(root / "probe")
    return results


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    (results,) = run_distributed(_single_process, world_size=1, root=str(tmp_path_factory.mktemp("released")))
    return results


def _compared(record: dict) -> dict:
    """What a step computed (its wall-clock time, timings, bytes and throughput left out)."""
    return {k: v for k, v in record.items() if k != "time" and not k.startswith(("perf/", "sync/"))}


@pytest.mark.parametrize("run", ["released", "released_teacher_on_host"])
def test_training_after_the_release_is_bit_identical(single_process, run):
    reference, released = single_process["reference"], single_process[run]
    assert sorted(reference) == sorted(released) == [1, 2, 3]
    assert all(record["train/grad_norm"] > 0 for record in reference.values())
    for step in reference:
        assert _compared(released[step]) == _compared(reference[step]), f"{run} step {step}"


def test_the_rollout_runs_with_every_part_released_and_counted(single_process):
    probe = single_process["during_rollout"]
    n, k = probe["numel"], probe["tensors"]
    assert probe["after_step"] == ["gradients", "optimizer", "teacher"]  # the sync reads the parameters
    assert probe["released"] == {"parameters": 4 * n, "gradients": 4 * n, "optimizer": 8 * n + 4 * k,
                                 "teacher": 4 * n}
    assert probe["empty"] and probe["resident"]
    assert math.isfinite(probe["next_loss"])


def test_every_memory_knob_at_dp2_equals_the_single_process_run(single_process, tmp_path):
    overrides = tiny_overrides("credit", tmp_path / "dp2", **COMMON, **ALL_KNOBS)
    dp2 = run_distributed(train_runs, world_size=2, runs=[("dp2", overrides)])[0]["dp2"]
    reference = single_process["reference"]
    assert sorted(dp2) == sorted(reference)
    for step, expected in reference.items():
        assert dp2[step]["rollout/reward_mean"] == expected["rollout/reward_mean"], step
        for name in ("train/loss", "train/grad_norm"):
            assert dp2[step][name] == pytest.approx(expected[name], abs=1e-4, rel=1e-4), (step, name)
