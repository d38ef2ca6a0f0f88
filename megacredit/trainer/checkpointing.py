"""Checkpoint and resume for the RL loop: policy, EMA teacher, optimizer, step, RNG states.

Saved in Megatron's distributed checkpoint format (megacredit.megatron.checkpoint: written to
``step_N.tmp`` and renamed when complete, so a half-written checkpoint is never picked). The data
position needs no state of its own: every step's prompts, samples and contrastive draws are
seeded from (seed, step), so resuming at step N regenerates exactly what an uninterrupted run
would. SIGTERM (Slurm preemption, ``scancel``) sets a flag; the loop saves at the end of the
current step and exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megacredit.megatron.checkpoint import (
    damaged_checkpoints,
    find_latest_checkpoint,
    load_checkpoint,
    read_checkpoint_info,
    resolve_checkpoint,
    save_checkpoint,
    sharded_like_params,
)
from megacredit.utils.progress import ProgressReporter


def _teacher_sharded(actor) -> Any:
    if actor.teacher is None:
        return None
    return {"teacher": sharded_like_params(actor.model_chunks, actor.teacher.state_tensors(), "teacher")}


def save(actor, ctx, ckpt_dir: str, step: int, keep_last: int, extra: dict[str, Any]) -> Path:
    """Save everything needed to continue after ``step`` completed steps (the trainer's state
    comes back first if it was released for the engine)."""
    actor.memory.restore()
    return save_checkpoint(actor.model_chunks, actor.optimizer, ctx, ckpt_dir, step,
                           extra_state=extra, extra_sharded_state=_teacher_sharded(actor), keep_last=keep_last)


def resume(actor, ctx, cfg, progress: ProgressReporter | None = None) -> tuple[int, dict[str, Any]]:
    """Restore from ``checkpoint.resume`` ("auto": the newest intact one; "none"; a path).

    "auto" skips damaged newer checkpoints and unfinished saves (``step_N.tmp``: the run was
    stopped while writing them) with a warning naming each and why, and starts fresh only when
    the directory holds no finished checkpoint at all; when every one is damaged it raises
    CheckpointError rather than start over. What is resumed is shown as a stage on ``progress``
    ("resuming from <dir> (step N)"). Returns (completed steps, extra state); (0, {}) when
    starting fresh.
    """
    mode = cfg.checkpoint.resume
    root = cfg.checkpoint_dir()
    if mode == "none":
        return 0, {}
    if mode == "auto":
        if not damaged_checkpoints(root) and find_latest_checkpoint(root, warn=False) is None:
            return 0, {}
        path = resolve_checkpoint(root, warn=ctx.rank == 0)  # the newest intact one, or raises
    else:
        path = Path(mode)
    description = f"resuming from {path}" + (f" (step {read_checkpoint_info(path)['step']})" if mode == "auto" else "")
    with (progress or ProgressReporter()).stage(description):
        loaded = load_checkpoint(actor.model_chunks, actor.optimizer, ctx, path,
                                 extra_sharded_state=_teacher_sharded(actor))
    if actor.teacher is not None:
        actor.teacher.load_state_tensors(loaded.extra_sharded_state["teacher"])
    return loaded.step, loaded.extra_state
