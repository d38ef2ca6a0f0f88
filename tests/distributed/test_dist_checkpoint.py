"""Distributed checkpoints: TP=2 -> TP=1 -> TP=2 resharding, optimizer state, RNG, extra state.

Three spawned runs share one module fixture (each spawn costs ~10 s):

A (2 ranks, TP=2): tiny Llama, one Adam step (clip_grad=1), save step 1 (with extra_state and
   an EMA-teacher-like extra sharded state = 0.5 * params), then a second step; also reloads its
   own checkpoint at the same layout (RNG restored).
B (1 rank, TP=1): loads A's checkpoint with optimizer, saves it again at TP=1, takes the second
   step.
C (2 ranks, TP=2): loads B's TP=1 checkpoint and takes the second step.

Logits after the load must equal A's logits before the save, and logits after the second step
must equal A's second-step logits (so Adam's moments and step count were restored), within
1e-5 (fp32; TP changes only the summation order of the matmuls).
"""

import json

import pytest
import torch

from megacredit.megatron.checkpoint import (
    LATEST_FILE,
    MARKER_FILE,
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    resolve_checkpoint,
)
from megacredit.utils.spawn import run_distributed
from megatron_test_helpers import build_model, fixed_tokens, probe_logits, train_step

TOL = dict(rtol=1e-5, atol=1e-5)


def _setup(tp: int, seed: int = 5):
    from megacredit.megatron import distributed
    from megacredit.megatron.optimizer import OptimizerSettings, build_optimizer, wrap_with_ddp

    ctx = distributed.initialize(tp, 1, seed=seed)
    chunks = wrap_with_ddp(build_model(ctx))
    optimizer = build_optimizer(chunks, OptimizerSettings(lr=1e-2, clip_grad=1.0, weight_decay=0.01))
    return ctx, chunks, optimizer


def _teacher_state(chunks, scale: float | None = None):
    from megacredit.megatron.checkpoint import sharded_like_params

    params = [p for c in chunks for p in c.parameters()]
    tensors = [p.detach() * scale if scale is not None else torch.zeros_like(p) for p in params]
    return {"ema_teacher": sharded_like_params(chunks, tensors, "ema_teacher")}, tensors


def _run_a(rank, world_size, root):
    from megacredit.megatron.checkpoint import load_checkpoint, save_checkpoint

    ctx, chunks, optimizer = _setup(tp=2)
    tokens, probe = fixed_tokens(0), fixed_tokens(1)
    train_step(chunks, optimizer, ctx, tokens)
    logits_1 = probe_logits(chunks, probe)
    teacher, _ = _teacher_state(chunks, scale=0.5)
    save_checkpoint(chunks, optimizer, ctx, root, step=1, extra_state={"data_position": 7},
                    extra_sharded_state=teacher)
    random_after_save = torch.rand(3)
    train_step(chunks, optimizer, ctx, tokens)
    logits_2 = probe_logits(chunks, probe)
    loaded = load_checkpoint(chunks, optimizer, ctx, root)
    return dict(logits_1=logits_1, logits_2=logits_2, random_after_save=random_after_save,
                random_after_load=torch.rand(3), rng_restored=loaded.rng_restored,
                logits_reloaded=probe_logits(chunks, probe))


def _load_and_continue(tp, source_root, resave_root=None):
    from megacredit.megatron.checkpoint import load_checkpoint, save_checkpoint

    ctx, chunks, optimizer = _setup(tp=tp, seed=99)  # a different init: the load must overwrite it
    tokens, probe = fixed_tokens(0), fixed_tokens(1)
    teacher, teacher_tensors = _teacher_state(chunks)
    loaded = load_checkpoint(chunks, optimizer, ctx, source_root, extra_sharded_state=teacher)
    params = [p.detach().clone() for c in chunks for p in c.parameters()]
    teacher_ratio_ok = all(
        torch.allclose(t, 0.5 * p, rtol=1e-6, atol=1e-7)
        for t, p in zip(loaded.extra_sharded_state["ema_teacher"], params)
    )
    logits_loaded = probe_logits(chunks, probe)
    if resave_root is not None:
        save_checkpoint(chunks, optimizer, ctx, resave_root, step=loaded.step,
                        extra_state=loaded.extra_state,
                        extra_sharded_state=_teacher_state(chunks, scale=0.5)[0])
    train_step(chunks, optimizer, ctx, tokens)
    return dict(step=loaded.step, extra_state=loaded.extra_state, rng_restored=loaded.rng_restored,
                saved_layout=loaded.saved_layout, teacher_ratio_ok=teacher_ratio_ok,
                logits_loaded=logits_loaded, logits_next=probe_logits(chunks, probe))


def _run_b(rank, world_size, source_root, resave_root):
    return _load_and_continue(1, source_root, resave_root)


def _run_c(rank, world_size, source_root):
    return _load_and_continue(2, source_root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    root_tp2, root_tp1 = tmp / "tp2", tmp / "tp1"
    a = run_distributed(_run_a, world_size=2, root=str(root_tp2))
    b = run_distributed(_run_b, world_size=1, source_root=str(root_tp2), resave_root=str(root_tp1))
    c = run_distributed(_run_c, world_size=2, source_root=str(root_tp1))
    return dict(a=a, b=b, c=c, root_tp2=root_tp2, root_tp1=root_tp1)


@pytest.mark.distributed
def test_tp2_checkpoint_loads_at_tp1_with_identical_logits(runs):
    a, (b,) = runs["a"][0], runs["b"]
    torch.testing.assert_close(b["logits_loaded"], a["logits_1"], **TOL)
    assert b["step"] == 1 and b["extra_state"] == {"data_position": 7}
    assert b["saved_layout"] == {"tp": 2, "pp": 1, "dp": 1} and not b["rng_restored"]
    assert b["teacher_ratio_ok"], "extra sharded state (teacher = 0.5 * params) not restored"


@pytest.mark.distributed
def test_tp1_checkpoint_loads_at_tp2(runs):
    a = runs["a"][0]
    for rank_result in runs["c"]:
        torch.testing.assert_close(rank_result["logits_loaded"], a["logits_1"], **TOL)
        assert rank_result["teacher_ratio_ok"]
        assert rank_result["saved_layout"] == {"tp": 1, "pp": 1, "dp": 1}


@pytest.mark.distributed
def test_optimizer_state_round_trip_gives_the_same_next_step(runs):
    a = runs["a"][0]
    assert not torch.allclose(a["logits_2"], a["logits_1"], atol=1e-3), "the second step changed nothing"
    torch.testing.assert_close(runs["b"][0]["logits_next"], a["logits_2"], **TOL)
    torch.testing.assert_close(runs["c"][0]["logits_next"], a["logits_2"], **TOL)


@pytest.mark.distributed
def test_same_layout_reload_restores_weights_and_rng(runs):
    a = runs["a"][0]
    assert a["rng_restored"]
    torch.testing.assert_close(a["random_after_load"], a["random_after_save"], rtol=0, atol=0)
    torch.testing.assert_close(a["logits_reloaded"], a["logits_1"], rtol=0, atol=0)


@pytest.mark.distributed
def test_saved_directory_layout(runs):
    root = runs["root_tp2"]
    assert (root / LATEST_FILE).read_text().strip() == "step_000001"
    info = json.loads((root / "step_000001" / MARKER_FILE).read_text())
    assert info["step"] == 1 and info["layout"] == {"tp": 2, "pp": 1, "dp": 1}
    assert not list(root.glob("*.tmp"))


# ---------------------------------------------------------------- filesystem rules, no Megatron
def _fake_checkpoint(root, step, complete=True, suffix=""):
    path = root / f"step_{step:06d}{suffix}"
    path.mkdir(parents=True)
    (path / "common.pt").write_bytes(b"x")
    if complete:
        (path / MARKER_FILE).write_text(json.dumps({"step": step}))
    return path


def test_tmp_and_incomplete_directories_are_never_chosen(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path, 3)
    _fake_checkpoint(tmp_path, 9, suffix=".tmp")  # a crashed save, even with a marker inside
    _fake_checkpoint(tmp_path, 7, complete=False)  # files but no completion marker
    (tmp_path / LATEST_FILE).write_text("step_000007\n")  # a stale marker naming it
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_000003"
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_000003"
    with pytest.raises(CheckpointError, match="step 7"):
        resolve_checkpoint(tmp_path, step=7)


def test_a_complete_newer_step_wins_over_an_outdated_latest_marker(tmp_path):
    _fake_checkpoint(tmp_path, 1)
    _fake_checkpoint(tmp_path, 2)  # crash after the rename, before `latest` was rewritten
    (tmp_path / LATEST_FILE).write_text("step_000001\n")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_000002"


def test_keep_last_prunes_the_oldest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    unfinished = _fake_checkpoint(tmp_path, 5, complete=False, suffix=".tmp")
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_000001", "step_000002"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert unfinished.exists()
    assert [p.name for p in prune_checkpoints(tmp_path, keep_last=0)] == []


def test_missing_or_empty_checkpoint_paths_raise(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


# ------------------------------------------------- resume past a damaged newest checkpoint
def _state_snapshot(chunks, optimizer, teacher) -> dict:
    """This rank's weights, Adam moments and step count, and teacher weights (copies)."""
    params = [p.detach().clone() for c in chunks for p in c.parameters()]
    adam = []
    for group in optimizer.optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.optimizer.state[param]
            adam.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in sorted(state.items())})
    return dict(params=params, adam=adam, teacher=[t.clone() for t in teacher.state_tensors()])


def _run_damaged_newest(rank, world_size, root):
    """Save steps 1 and 2 through the trainer's checkpointing (TP=2: each rank writes its own
    shards), truncate a shard that rank 1 wrote into step 2, resume a freshly initialised model
    with checkpoint.resume=auto."""
    import logging
    from types import SimpleNamespace

    from megacredit.megatron.teacher import TeacherWeights
    from megacredit.megatron.trainer_memory import TrainerMemory
    from megacredit.trainer import checkpointing

    ctx, chunks, optimizer = _setup(tp=2)
    teacher = TeacherWeights(chunks, "ema", 0.5, 1)
    actor = SimpleNamespace(model_chunks=chunks, optimizer=optimizer, teacher=teacher,
                             memory=TrainerMemory(chunks, optimizer, teacher))
    for step in (1, 2):
        train_step(chunks, optimizer, ctx, fixed_tokens(step))
        teacher.after_optimizer_step(chunks)
        checkpointing.save(actor, ctx, root, step, keep_last=0, extra={"completed_steps": step})
        if step == 1:
            saved_at_1 = _state_snapshot(chunks, optimizer, teacher)
    newest = f"{root}/step_000002"
    if rank == 0:
        import glob
        import os

        shard = sorted(glob.glob(f"{newest}/__1_*.distcp"), key=os.path.getsize)[-1]  # rank 1's
        with open(shard, "r+b") as handle:
            handle.truncate(os.path.getsize(shard) // 2)
    torch.distributed.barrier()

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megacredit.megatron.checkpoint").addHandler(handler)
    ctx, chunks, optimizer = _setup(tp=2, seed=99)  # a different init: the load must overwrite it
    teacher = TeacherWeights(chunks, "ema", 0.5, 1)
    fresh = SimpleNamespace(model_chunks=chunks, optimizer=optimizer, teacher=teacher,
                             memory=TrainerMemory(chunks, optimizer, teacher))
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(resume="auto"), checkpoint_dir=lambda: root)
    step, extra = checkpointing.resume(fresh, ctx, cfg)
    return dict(step=step, extra=extra, saved=saved_at_1, resumed=_state_snapshot(chunks, optimizer, teacher),
                warnings=warnings, newest=newest)


def _assert_bit_equal(resumed, saved):
    assert len(resumed) == len(saved) > 0
    for got, want in zip(resumed, saved):
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            _assert_bit_equal(list(got.values()), list(want.values()))
        elif torch.is_tensor(want):
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            assert got == want


@pytest.mark.distributed
def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path):
    results = run_distributed(_run_damaged_newest, world_size=2, root=str(tmp_path))
    for rank, result in enumerate(results):
        assert result["step"] == 1 and result["extra"] == {"completed_steps": 1}
        for part in ("params", "adam", "teacher"):
            _assert_bit_equal(result["resumed"][part], result["saved"][part])
    damaged = [w for w in results[0]["warnings"] if "step_000002" in w]
    assert len(damaged) == 1 and "damaged" in damaged[0] and "bytes" in damaged[0], results[0]["warnings"]
    assert results[1]["warnings"] == []  # the warning comes once, from rank 0
    info = json.loads((tmp_path / "step_000002" / MARKER_FILE).read_text())
    shards = [name for name in info["manifest"] if name.endswith(".distcp")]
    assert {name.split("_")[2] for name in shards} == {"0", "1"}  # both ranks' shards are listed


def test_resume_auto_with_every_checkpoint_damaged_raises_one_line(tmp_path):
    from types import SimpleNamespace

    from megacredit.megatron.checkpoint import damaged_checkpoints, find_latest_checkpoint
    from megacredit.trainer import checkpointing

    for step in (1, 2):
        _manifested_checkpoint(tmp_path, step)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    (tmp_path / "step_000002" / "__0_0.distcp").write_bytes(b"short")
    (tmp_path / "step_000001" / "common.pt").write_bytes(b"same size")  # 9 bytes, other content
    assert find_latest_checkpoint(tmp_path) is None
    problems = dict((p.name, why) for p, why in damaged_checkpoints(tmp_path))
    assert "checksum" in problems["step_000001"] and "bytes" in problems["step_000002"]
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(resume="auto"), checkpoint_dir=lambda: str(tmp_path))
    ctx = SimpleNamespace(rank=0)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as raised:
        checkpointing.resume(None, ctx, cfg)
    assert "\n" not in str(raised.value) and "step_000001" in str(raised.value)
    empty = SimpleNamespace(checkpoint=cfg.checkpoint, checkpoint_dir=lambda: str(tmp_path / "new"))
    assert checkpointing.resume(None, ctx, empty) == (0, {})  # nothing saved yet: start fresh


def _manifested_checkpoint(root, step):
    """A step directory with a format-2 marker whose manifest matches its two files."""
    from megacredit.megatron.checkpoint_manifest import list_files

    path = root / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "common.pt").write_bytes(b"123456789")
    (path / "__0_0.distcp").write_bytes(bytes(range(200)))
    info = {"step": step, "format_version": 2, "manifest": list_files(path)}
    (path / MARKER_FILE).write_text(json.dumps(info))
    return path


def test_prune_keeps_newest_intact_and_a_newer_damaged_one(tmp_path):
    for step in (1, 2, 3, 4):
        _manifested_checkpoint(tmp_path, step)
    (tmp_path / "step_000004" / "__0_0.distcp").unlink()  # newest: damaged (missing shard)
    (tmp_path / "step_000001" / "__0_0.distcp").write_bytes(b"")  # oldest: damaged
    deleted = prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in deleted] == ["step_000001", "step_000002"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000003", "step_000004"]
