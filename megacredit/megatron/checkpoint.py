"""Resumable Megatron distributed checkpoints (``megatron.core.dist_checkpointing``).

Layout of a checkpoint root::

    root/
      latest                      text file "step_000123", written last (atomic replace)
      step_000120/                a complete checkpoint
        megacredit_checkpoint.json  {"step", "layout", "format_version"}: the completion marker
        common.pt, *.distcp, .metadata, metadata.json   (dist_checkpointing files)
      step_000123/
      step_000126.tmp/            a save in progress or one that crashed: never picked

What is saved: the model's sharded state dict (resharding on load: a TP=2 checkpoint loads at
TP=1 and back, any PP/DP), the optimizer's (Megatron optimizer, also reshardable), per-rank RNG
states (restored only when the layout is unchanged), ``extra_state`` (any picklable dict: step,
data-loader position, ... saved once in the common part, so it must be the same on all ranks),
and ``extra_sharded_state`` (a mapping of ShardedTensors, e.g. the EMA teacher's weights built
with :func:`sharded_like_params`).

Atomicity: every rank writes into ``step_XXXXXX.tmp/``; after a barrier rank 0 writes the
completion marker, renames the directory to ``step_XXXXXX/``, then rewrites ``latest``, prunes to
``keep_last`` and a final barrier lets every rank return. A crash at any point leaves either the
previous complete checkpoint as the latest, or the new one complete.

Saves are synchronous. Megatron's asynchronous save starts a multiprocessing Manager which
re-imports the launched script: it would need an ``if __name__ == "__main__":`` guard in every
entry point (see ../shared/notes/facts-of-this-machine.md), and is not used here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megacredit.megatron import cpu_compat
from megacredit.megatron.distributed import ParallelContext
from megacredit.utils.errors import SetupError, one_line

logger = logging.getLogger(__name__)

MARKER_FILE = "megacredit_checkpoint.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Megatron's DistributedOptimizer format that reshards over TP/PP/DP (ignored by the others).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(SetupError, RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model."""


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


def is_complete_checkpoint(path: str | Path) -> bool:
    """A finished step directory: name ``step_N`` (no ``.tmp``) and the completion marker."""
    path = Path(path)
    return bool(_STEP_DIR.match(path.name)) and (path / MARKER_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step directories under ``root``, oldest first (``*.tmp`` and partial ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    complete = [p for p in root.iterdir() if p.is_dir() and is_complete_checkpoint(p)]
    return sorted(complete, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint in ``root`` or None.

    Follows the ``latest`` marker when it names a complete checkpoint, else falls back to the
    highest complete ``step_N`` directory (a crash between rename and marker update).
    """
    root = Path(root)
    marker = root / LATEST_FILE
    candidates = list_checkpoints(root)
    if marker.is_file():
        named = root / marker.read_text().strip()
        if is_complete_checkpoint(named) and (not candidates or named == candidates[-1]):
            return named
    return candidates[-1] if candidates else None


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A complete step directory from a root (latest, or ``step``) or a step directory itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if is_complete_checkpoint(path):
        return path
    if step is not None:
        chosen = path / step_dir_name(step)
        if not is_complete_checkpoint(chosen):
            raise CheckpointError(f"no complete checkpoint for step {step} in {path} (looked for {chosen})")
        return chosen
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"no complete checkpoint in {path}: expected step_N/ directories holding {MARKER_FILE} "
            f"(*.tmp directories are unfinished saves)"
        )
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


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _publish(tmp_dir: Path, final_dir: Path, root: Path, info: dict[str, Any]) -> None:
    """Rank 0: completion marker, rename tmp -> final, then the ``latest`` marker."""
    (tmp_dir / MARKER_FILE).write_text(json.dumps(info, indent=1))
    if final_dir.exists():  # re-saving the same step: move the old copy aside first
        stale = final_dir.with_name(final_dir.name + ".old.tmp")
        shutil.rmtree(stale, ignore_errors=True)
        final_dir.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir.rename(final_dir)
    marker_tmp = root / (LATEST_FILE + ".tmp")
    marker_tmp.write_text(final_dir.name + "\n")
    os.replace(marker_tmp, root / LATEST_FILE)


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 = keep all); rank 0 only.

    Returns the deleted directories. Unfinished ``*.tmp`` directories are left alone.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps all), got {keep_last}")
    complete = list_checkpoints(root)
    doomed = complete[:-keep_last] if keep_last else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


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
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    final_dir = root / step_dir_name(step)
    tmp_dir = root / (final_dir.name + ".tmp")
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a crashed save of this step
        tmp_dir.mkdir()
    _barrier()
    state = _build_state(model_chunks, optimizer, ctx, step, extra_state, extra_sharded_state,
                         loading=False, with_rng=save_rng, with_optimizer=True)
    dist_checkpointing.save(state, str(tmp_dir))
    _barrier()
    if ctx.rank == 0:
        info = {"step": int(step), "layout": _layout(ctx), "format_version": FORMAT_VERSION,
                "has_optimizer": optimizer is not None, "has_rng": save_rng,
                "params_dtype": _params_dtype_name(model_chunks)}
        _publish(tmp_dir, final_dir, root, info)
        if keep_last:
            prune_checkpoints(root, keep_last)
    _barrier()
    return final_dir


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

    path = resolve_checkpoint(ckpt_dir, step)
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
