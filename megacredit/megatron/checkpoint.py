"""Resumable Megatron distributed checkpoints (``megatron.core.dist_checkpointing``).

Layout of a checkpoint root::

    root/
      latest                      text file "step_000123", written last (atomic replace)
      step_000120/                a complete checkpoint
        megacredit_checkpoint.json  {"step", "layout", "format_version", "manifest", ...}: the
                                    completion marker; "manifest" lists every other file's size
                                    (and SHA-256 of the small ones, checkpoint_manifest.py)
        common.pt, *.distcp, .metadata, metadata.json   (dist_checkpointing files)
      step_000123/
      step_000126.tmp/            a save in progress or one that crashed: never picked

A checkpoint is intact only when its files still match its manifest (:func:`checkpoint_problem`);
:func:`find_latest_checkpoint` skips a damaged newer one (a truncated or missing shard) with a
warning naming it and returns the newest intact one.

What is saved: the model's sharded state dict (resharding on load: a TP=2 checkpoint loads at
TP=1 and back, any PP/DP), the optimizer's (Megatron optimizer, also reshardable), per-rank RNG
states (restored only when the layout is unchanged), ``extra_state`` (any picklable dict: step,
data-loader position, ... saved once in the common part, so it must be the same on all ranks),
and ``extra_sharded_state`` (a mapping of ShardedTensors, e.g. the EMA teacher's weights built
with :func:`sharded_like_params`).

Atomicity: rank 0 removes the leftovers of crashed saves (``step_*.tmp``), every rank checks
that the save fits on the disk (megacredit/megatron/checkpoint_disk.py; a full disk stops every
rank with one line before anything is written) and writes into ``step_XXXXXX.tmp/``; after a
barrier rank 0 lists the files (every other rank confirms the listing from its own view of the
shared directory), writes the completion marker with that manifest (fsynced), renames the
directory to ``step_XXXXXX/``, then rewrites ``latest``, prunes to ``keep_last`` (each old
directory renamed to ``*.deleted.tmp`` first, so a half-deleted one is never a candidate) and a
final collective lets every rank return (or raise, when the ranks' views disagree or rank 0 could
not publish). A kill at any point leaves either the previous complete checkpoint as the newest,
or the new one complete (tests/integration/test_checkpoint_faults.py kills a save at each step).

Saves are synchronous. Megatron's asynchronous save starts a multiprocessing Manager which
re-imports the launched script: it would need an ``if __name__ == "__main__":`` guard in every
entry point (without one, the save hangs), and is not used here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megacredit.megatron import cpu_compat
from megacredit.megatron.checkpoint_manifest import list_files, listing_disagreement, manifest_problem
from megacredit.megatron.checkpoint_disk import (
    checkpoint_bytes,
    free_bytes,
    fsync_directory,
    is_out_of_space,
    remove_unfinished_saves,
    space_problem,
    state_bytes,
    unfinished_saves,
    write_durably,
)
from megacredit.megatron.distributed import ParallelContext
from megacredit.utils.comm import all_gather_objects, broadcast_object
from megacredit.utils.errors import SetupError, one_line

logger = logging.getLogger(__name__)

MARKER_FILE = "megacredit_checkpoint.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 2
"""2: the marker holds a manifest of the directory's files (checkpoint_manifest)."""
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Megatron's DistributedOptimizer format that reshards over TP/PP/DP (ignored by the others).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(SetupError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


class CheckpointSpaceError(CheckpointError):
    """A save does not fit on its filesystem (checked before writing, or ENOSPC while writing)."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored."""

    path: Path
    """The step directory that was loaded."""
    step: int
    """Training step stored in the checkpoint."""
    extra_state: dict[str, Any] = field(default_factory=dict)
    """The plain ``extra_state`` dict passed to :func:`save_checkpoint`."""
    extra_sharded_state: Any = None
    """The loaded tensors of ``extra_sharded_state`` (same structure as requested), or None."""
    rng_restored: bool = False
    """True when RNG states were restored (same TP/PP/DP layout as at save time)."""
    saved_layout: dict[str, int] = field(default_factory=dict)
    """{"tp", "pp", "dp"} of the run that saved the checkpoint."""


def step_dir_name(step: int) -> str:
    """``step_000123`` for step 123."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:06d}"


def _layout(ctx: ParallelContext) -> dict[str, int]:
    return {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not an intact checkpoint (None when it is one).

    Intact: a ``step_N`` directory (no ``.tmp``) whose completion marker parses and whose files
    match the marker's manifest (megacredit.megatron.checkpoint_manifest). Markers of format 1
    (saved before manifests existed) are trusted as they are.
    """
    path = Path(path)
    if not _STEP_DIR.match(path.name) or not path.is_dir():
        return "not a step_N checkpoint directory"
    marker = path / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} (an unfinished save)"
    try:
        info = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{MARKER_FILE} is unreadable ({one_line(error)})"
    if not isinstance(info, dict) or "step" not in info:
        return f"{MARKER_FILE} holds no step"
    if int(info.get("format_version", 1)) < 2:
        return None
    if not isinstance(info.get("manifest"), dict):
        return f"{MARKER_FILE} holds no manifest"
    return manifest_problem(path, info["manifest"])


def is_complete_checkpoint(path: str | Path) -> bool:
    """An intact checkpoint (see :func:`checkpoint_problem`)."""
    return checkpoint_problem(path) is None


def _finished_step_dirs(root: Path) -> list[Path]:
    """``step_N`` directories holding a completion marker, oldest first (intact or not)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER_FILE).is_file()]
    return sorted(found, key=_step_of)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Intact step directories under ``root``, oldest first (``*.tmp``, partial and damaged
    ones skipped)."""
    return [p for p in _finished_step_dirs(Path(root)) if is_complete_checkpoint(p)]


def damaged_checkpoints(root: str | Path) -> list[tuple[Path, str]]:
    """(step directory, problem) of each finished save whose contents no longer match."""
    found = [(p, checkpoint_problem(p)) for p in _finished_step_dirs(Path(root))]
    return [(p, problem) for p, problem in found if problem is not None]


def find_latest_checkpoint(root: str | Path, warn: bool = True) -> Path | None:
    """The newest intact checkpoint in ``root``, or None.

    A newer finished save that is damaged (a truncated or missing shard, see
    :func:`checkpoint_problem`) is skipped with a warning naming it, and so is a newer unfinished
    save (``step_N.tmp``: the run was stopped while writing it) (``warn=False``: silently, e.g. on
    all ranks but 0). The ``latest`` file is advisory (a crash between rename and its update
    leaves it one step behind).
    """
    chosen = None
    for path in reversed(_finished_step_dirs(Path(root))):
        problem = checkpoint_problem(path)
        if problem is None:
            chosen = path
            break
        if warn:
            logger.warning("checkpoint %s is damaged (%s); skipping it", path, problem)
    if warn:
        newest = _step_of(chosen) if chosen is not None else -1
        for path in unfinished_saves(root, newer_than=newest):
            logger.warning("%s is an unfinished save (the run stopped while writing it); skipping it", path)
    return chosen


def _no_intact_checkpoint(root: Path) -> CheckpointError:
    damaged = damaged_checkpoints(root)
    if damaged:
        listed = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
        return CheckpointError(f"no intact checkpoint in {root} ({listed}); restore the files, "
                               f"delete the damaged step directories, or start fresh with checkpoint.resume=none")
    return CheckpointError(f"no complete checkpoint in {root}: expected step_N/ directories holding "
                           f"{MARKER_FILE} (*.tmp directories are unfinished saves)")


def resolve_checkpoint(path: str | Path, step: int | None = None, warn: bool = True) -> Path:
    """An intact step directory from a root (latest, or ``step``) or a step directory itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if _STEP_DIR.match(path.name) and (path / MARKER_FILE).is_file():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    if step is not None:
        chosen = path / step_dir_name(step)
        problem = checkpoint_problem(chosen)
        if problem is not None:
            raise CheckpointError(f"no complete checkpoint for step {step} in {path} ({chosen.name}: {problem})")
        return chosen
    latest = find_latest_checkpoint(path, warn)
    if latest is None:
        raise _no_intact_checkpoint(path)
    return latest


def read_checkpoint_info(step_dir: str | Path) -> dict[str, Any]:
    """The completion marker's content: step, saved layout, params dtype, format version."""
    return json.loads((Path(step_dir) / MARKER_FILE).read_text())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers (their state-dict keys differ)."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _model_sharded_state(model_chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    model_chunks = [_unwrap(chunk) for chunk in model_chunks]
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if cpu_compat.cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "cuda" in state and cpu_compat.cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(ctx: ParallelContext, data: Any):
    """One RNG state per rank: a ShardedObject over the (pp, tp, dp) grid."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "megacredit_rng_state", data,
        (ctx.pp_size, ctx.tp_size, ctx.dp_size), (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank), replica_id=0,
    )


def _build_state(model_chunks, optimizer, ctx, step, extra_state, extra_sharded_state, *,
                 loading: bool, with_rng: bool, with_optimizer: bool) -> dict[str, Any]:
    state = _model_sharded_state(model_chunks)
    if optimizer is not None and with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=_OPTIMIZER_METADATA
        )
    if with_rng:
        state["rng_state"] = _rng_sharded_object(ctx, None if loading else _rng_state())
    if extra_sharded_state is not None:
        state["extra_sharded_state"] = extra_sharded_state
    if not loading:
        state["megacredit"] = {"step": int(step), "layout": _layout(ctx), "extra_state": dict(extra_state or {})}
    return state


def _params_dtype_name(model_chunks: Sequence[torch.nn.Module]) -> str:
    """"float32"/"bfloat16"/... of the model parameters (what a loader must build)."""
    first = next(param for chunk in model_chunks for param in chunk.parameters())
    return str(first.dtype).replace("torch.", "")


def _publish(tmp_dir: Path, final_dir: Path, root: Path, info: dict[str, Any]) -> None:
    """Rank 0: completion marker, rename tmp -> final, then the ``latest`` marker."""
    write_durably(tmp_dir / MARKER_FILE, json.dumps(info, indent=1))
    if final_dir.exists():  # re-saving the same step: move the old copy aside first
        stale = final_dir.with_name(final_dir.name + ".old.tmp")
        shutil.rmtree(stale, ignore_errors=True)
        final_dir.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir.rename(final_dir)
    fsync_directory(root)
    marker_tmp = root / (LATEST_FILE + ".tmp")
    marker_tmp.write_text(final_dir.name + "\n")
    os.replace(marker_tmp, root / LATEST_FILE)


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` intact checkpoints (0 = keep all); rank 0 only.

    Deletes the older intact ones and the damaged ones older than the oldest kept (a damaged
    save newer than every intact one stays for inspection until its step is saved again).
    Returns the deleted directories. Unfinished ``*.tmp`` directories are left alone.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps all), got {keep_last}")
    intact = list_checkpoints(root)
    if not keep_last or not intact:
        return []
    kept = intact[-keep_last:]
    oldest_kept = _step_of(kept[0])
    doomed = [p for p in _finished_step_dirs(Path(root)) if p not in kept and _step_of(p) < oldest_kept]
    for path in doomed:  # renamed first: a deletion stopped half-way leaves no damaged candidate
        trash = path.with_name(path.name + ".deleted.tmp")
        shutil.rmtree(trash, ignore_errors=True)
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _confirmed_listing(tmp_dir: Path, rank: int) -> tuple[dict[str, Any], str | None]:
    """Rank 0's listing of the saved files (with checksums), checked against every rank's own
    view; returns it and the ranks' disagreements (None when all agree). Collective."""
    reference = broadcast_object(list_files(tmp_dir, exclude=(MARKER_FILE,)) if rank == 0 else None)
    own = reference if rank == 0 else list_files(tmp_dir, exclude=(MARKER_FILE,), checksums=False)
    reports = all_gather_objects(listing_disagreement(reference, own))
    problems = [f"rank {r} {report}" for r, report in enumerate(reports) if report]
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more ranks)" if len(problems) > 3 else "")
        return reference, (f"{shown}: the checkpoint directory must be on a filesystem shared "
                           f"(coherently) by all ranks")
    return reference, None


def save_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    ctx: ParallelContext,
    ckpt_dir: str | Path,
    step: int,
    extra_state: Mapping[str, Any] | None = None,
    extra_sharded_state: Any = None,
    keep_last: int = 0,
    save_rng: bool = True,
) -> Path:
    """Save a checkpoint of step ``step`` under the root ``ckpt_dir``; collective on all ranks.

    Args:
        model_chunks: this rank's model chunks (bare or DDP-wrapped).
        optimizer: the Megatron optimizer, or None for weights only (e.g. conversion).
        ctx: the parallel layout (stored in the completion marker).
        ckpt_dir: the checkpoint root (created if missing; must be shared by all ranks).
        step: the training step; the directory is ``step_{step:06d}``.
        extra_state: picklable dict saved once (from rank 0) in the common part.
        extra_sharded_state: nested dict/list of ShardedTensors (:func:`sharded_like_params`).
        keep_last: keep only the newest N complete checkpoints after this save (0 = all).
        save_rng: save every rank's RNG states (python, numpy, torch, Megatron tracker).

    Returns:
        The final step directory.
    """
    root = Path(ckpt_dir)
    final_dir = root / step_dir_name(step)
    tmp_dir = root / (final_dir.name + ".tmp")
    state = _build_state(model_chunks, optimizer, ctx, step, extra_state, extra_sharded_state,
                         loading=False, with_rng=save_rng, with_optimizer=True)
    needed = sum(all_gather_objects(state_bytes(state)))
    _prepare_save(root, tmp_dir, step, needed, ctx.rank)
    _write_state(state, root, tmp_dir, step, needed, ctx.rank)
    manifest, problem = _confirmed_listing(tmp_dir, ctx.rank)
    if ctx.rank == 0 and problem is None:
        info = {"step": int(step), "layout": _layout(ctx), "format_version": FORMAT_VERSION,
                "has_optimizer": optimizer is not None, "has_rng": save_rng,
                "params_dtype": _params_dtype_name(model_chunks), "manifest": manifest}
        try:
            _publish(tmp_dir, final_dir, root, info)
            if keep_last:
                prune_checkpoints(root, keep_last)
        except OSError as error:  # e.g. a full disk: every rank must hear of it, not hang
            problem = _failed_save_problem(is_out_of_space(error), one_line(error), root, tmp_dir, step, needed)
    _raise_on_every_rank(problem)  # also the final barrier
    return final_dir


def _raise_on_every_rank(problem: tuple[bool, str] | None) -> None:
    """Every rank raises rank 0's (out of space?, message) together, or returns. Collective."""
    problem = broadcast_object(problem)
    if problem is not None:
        out_of_space, message = problem
        raise (CheckpointSpaceError if out_of_space else CheckpointError)(message)


def _previous_and_needed(root: Path, needed: int) -> tuple[Path | None, int]:
    """The newest complete checkpoint (kept until the new one is complete) and the bytes the new
    one needs: the larger of its size and ``needed`` (the tensors being saved)."""
    previous = find_latest_checkpoint(root, warn=False)
    return previous, max(needed, checkpoint_bytes(previous, MARKER_FILE) if previous else 0)


def _prepare_save(root: Path, tmp_dir: Path, step: int, needed: int, rank: int) -> None:
    """Rank 0 removes killed saves' leftovers, checks the free space and makes ``tmp_dir``; every
    rank raises together when it could not (nothing written). Collective."""
    problem = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_unfinished_saves(root)
            previous, needed = _previous_and_needed(root, needed)
            free = free_bytes(root)
            if free < needed:
                problem = (True, space_problem(step, tmp_dir, needed, free, previous))
            else:
                tmp_dir.mkdir()
        except OSError as error:
            problem = _failed_save_problem(is_out_of_space(error), one_line(error), root, tmp_dir, step, needed)
    _raise_on_every_rank(problem)


def _write_state(state: dict[str, Any], root: Path, tmp_dir: Path, step: int, needed: int, rank: int) -> None:
    """Megatron's collective write into ``tmp_dir``; a failure on any rank (a full disk: ENOSPC)
    raises on every rank, after rank 0 removed the unfinished directory. Collective."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megacredit.megatron import writer_queue

    writer_queue.install()  # Megatron's writer Manager dies with this rank (a killed rank leaves none)
    try:
        dist_checkpointing.save(state, str(tmp_dir))
        failure = None
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - shared with every rank below
        failure = error
    failures = all_gather_objects(None if failure is None else (is_out_of_space(failure), one_line(failure)))
    failed = [(other, report) for other, report in enumerate(failures) if report is not None]
    if not failed:
        return
    out_of_space, detail = any(report[0] for _, report in failed), f"rank {failed[0][0]}: {failed[0][1][1]}"
    _raise_on_every_rank(_failed_save_problem(out_of_space, detail, root, tmp_dir, step, needed) if rank == 0
                         else None)


def _failed_save_problem(out_of_space: bool, detail: str, root: Path, tmp_dir: Path, step: int,
                         needed: int) -> tuple[bool, str]:
    """Rank 0: (out of space?, the one line) of a save that failed before or while it was
    published; the unfinished directory is removed (it may hold the space a retry needs). A write
    error counts as a full disk also when its text does not say so (torch.save reports "iostream
    error") but the filesystem has less room than the save still needed."""
    previous, needed = _previous_and_needed(root, needed)
    written = sum(entry["size"] for entry in list_files(tmp_dir, checksums=False).values()) if tmp_dir.is_dir() else 0
    out_of_space = out_of_space or free_bytes(root) < needed - written
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if out_of_space:
        return True, space_problem(step, tmp_dir, needed, free_bytes(root), previous)
    newest = f"the newest complete checkpoint is {previous.name}" if previous else "no complete checkpoint exists"
    return False, f"the checkpoint of step {step} could not be written to {tmp_dir} ({detail}); {newest}"


def _resolve_on_every_rank(ckpt_dir: str | Path, step: int | None, rank: int) -> Path:
    """:func:`resolve_checkpoint` on each rank; every rank raises if any rank failed or the ranks
    chose different directories (so none is left waiting in the collective load). Collective."""
    try:
        path, problem = resolve_checkpoint(ckpt_dir, step, warn=rank == 0), None
    except CheckpointError as error:
        path, problem = None, str(error)
    views = all_gather_objects((str(path) if path else None, problem))
    if problem is not None:
        raise CheckpointError(problem)
    for other, (other_path, other_problem) in enumerate(views):
        if other_problem is not None:
            raise CheckpointError(f"rank {other}: {other_problem}")
        if other_path != views[0][0]:
            raise CheckpointError(f"ranks chose different checkpoints ({views[0][0]} on rank 0, {other_path} on "
                                  f"rank {other}): the checkpoint directory must be shared by all ranks")
    return path


def load_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    ctx: ParallelContext,
    ckpt_dir: str | Path,
    step: int | None = None,
    extra_sharded_state: Any = None,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint into ``model_chunks`` (and ``optimizer``) at the CURRENT layout.

    ``ckpt_dir`` is a root (the latest complete checkpoint, or ``step``) or a step directory.
    ``extra_sharded_state``: the same structure that was saved, built for this layout (its
    tensors are overwritten and also returned). RNG states are restored only when the saved
    TP/PP/DP layout equals the current one. Raises CheckpointError on a missing/incomplete
    checkpoint or a model that does not match it.
    """
    from megatron.core import dist_checkpointing

    path = _resolve_on_every_rank(ckpt_dir, step, ctx.rank)
    info = read_checkpoint_info(path)
    saved_layout = dict(info.get("layout", {}))
    with_rng = load_rng and bool(info.get("has_rng")) and saved_layout == _layout(ctx)
    with_optimizer = optimizer is not None and load_optimizer
    if with_optimizer and not info.get("has_optimizer", False):
        raise CheckpointError(f"{path} holds no optimizer state; pass load_optimizer=False to load weights only")
    state = _build_state(model_chunks, optimizer, ctx, info["step"], None, extra_sharded_state,
                         loading=True, with_rng=with_rng, with_optimizer=with_optimizer)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        with warnings.catch_warnings():
            # PyTorch's FutureWarnings "Please use DTensor instead and we are deprecating ShardedTensor."
            # and "`load_state_dict` is deprecated ...": raised on every load by Megatron-Core 0.16's
            # torch_dist strategy (strategies/torch.py), which builds ShardedTensors and calls
            # torch.distributed.checkpoint.load_state_dict; nothing megacredit can change.
            warnings.filterwarnings("ignore", "Please use DTensor instead and we are deprecating ShardedTensor",
                                    FutureWarning)
            warnings.filterwarnings("ignore", "`load_state_dict` is deprecated", FutureWarning)
            loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - re-raised with a hint
        raise CheckpointError(
            f"cannot load {path} into this model ({one_line(error)}); "
            f"check that the model config matches the checkpoint"
        ) from error
    _apply_loaded(model_chunks, optimizer if with_optimizer else None, loaded)
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    common = loaded.get("megacredit", {})
    return LoadedCheckpoint(
        path=path, step=int(info["step"]), extra_state=dict(common.get("extra_state", {})),
        extra_sharded_state=loaded.get("extra_sharded_state"), rng_restored=with_rng,
        saved_layout=saved_layout,
    )


def _apply_loaded(model_chunks: Sequence[torch.nn.Module], optimizer, loaded: Mapping[str, Any]) -> None:
    model_chunks = [_unwrap(chunk) for chunk in model_chunks]
    if len(model_chunks) == 1:
        model_chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(model_chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])


def sharded_like_params(
    model_chunks: Sequence[torch.nn.Module], tensors: Sequence[torch.Tensor], prefix: str
) -> list[Any]:
    """ShardedTensors for ``tensors`` shaped like this rank's parameters (in ``parameters()``
    order), sharded exactly as the model's parameters -- e.g. the EMA teacher weights
    (``TeacherWeights.state_tensors()``). Pass the list as (part of) ``extra_sharded_state``;
    like the model, it reshards on load. ``prefix`` names the group in the checkpoint.
    """
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
    )

    params = [param for chunk in model_chunks for param in chunk.parameters()]
    if len(params) != len(tensors):
        raise ValueError(f"sharded_like_params: got {len(tensors)} tensors for {len(params)} parameters")
    model_state = _model_sharded_state(model_chunks)
    by_index = get_param_id_to_sharded_param_map(model_state, params)
    missing = [i for i in range(len(params)) if i not in by_index]
    if missing:
        raise CheckpointError(f"sharded_like_params: parameters {missing} have no sharded counterpart")
    return [make_sharded_optimizer_tensor(by_index[i], tensor, prefix) for i, tensor in enumerate(tensors)]
