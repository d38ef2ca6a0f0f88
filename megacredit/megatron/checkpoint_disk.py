"""The disk side of a checkpoint save: the space it needs and the space there is, the one line a
full disk gives, and writes that reach the disk before the rename that publishes them.

:func:`megacredit.megatron.checkpoint.save_checkpoint` checks the space BEFORE any rank writes
(every rank takes the same decision, so a multi-rank save never stops half-way on one rank), and
again reads a failed write: ENOSPC in the middle of the write (another process filled the disk)
gives the same line, after the unfinished directory was removed. The previous checkpoints are
never touched: they are removed only after a new one is complete.

What a save needs: the size of the newest complete checkpoint of the same root (its manifest), or,
for the first save, the bytes of the tensors being saved (every rank's main replicas, summed),
whichever is larger.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

MIB = 2**20
_UNFINISHED_DIR = re.compile(r"^step_(\d+)\.(.*\.)?tmp$")
"""A save in progress or one that was killed (``step_N.tmp``), or a directory being deleted
(``step_N.deleted.tmp``, ``step_N.old.tmp``)."""


def state_bytes(sharded_state: Any) -> int:
    """Bytes of this rank's main-replica tensors in a sharded state dict (what it writes)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    total = 0
    for value in nested_values(sharded_state):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and value.data is not None \
                and is_main_replica(value.replica_id):
            total += value.data.numel() * value.data.element_size()
    return total


def checkpoint_bytes(step_dir: Path, marker_file: str) -> int:
    """Total size of a complete checkpoint's files, from the manifest in its marker (0 if none)."""
    try:
        manifest = json.loads((step_dir / marker_file).read_text()).get("manifest") or {}
    except (OSError, ValueError):
        return 0
    return sum(int(entry.get("size", 0)) for entry in manifest.values())


def free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged writer) of the filesystem holding ``path`` or its nearest
    existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_out_of_space(error: BaseException) -> bool:
    """True when ``error`` (or an error it wraps, or its text, as torch.distributed.checkpoint
    reports a worker's failure) is ENOSPC."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def space_problem(step: int, tmp_dir: Path, needed: int, free: int, previous: Path | None) -> str:
    """The one line of a save that does not fit: the path, the space needed and free, what is
    intact, and what to do."""
    kept = (f"{previous.name} is intact and checkpoint.resume=auto continues from it" if previous is not None
            else "no earlier checkpoint exists")
    return (f"no space left on the filesystem of {tmp_dir} for the checkpoint of step {step}: it needs about "
            f"{needed / MIB:.1f} MiB, {free / MIB:.1f} MiB are free; {kept}; free space or set "
            f"checkpoint.dir to a larger filesystem (old checkpoints are removed only after a new one is complete)")


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it (a completion marker must be on the disk before
    the rename that publishes its directory)."""
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """fsync a directory, so that a rename inside it is on the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def unfinished_saves(root: Path, newer_than: int | None = None) -> list[Path]:
    """``step_N.tmp`` directories under ``root``, oldest first: saves that were killed before they
    were published (never candidates for a resume); ``newer_than``: only those of later steps,
    and no ``*.deleted.tmp`` / ``*.old.tmp`` leftovers of deletions."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if (match := _UNFINISHED_DIR.match(path.name)) and path.is_dir()]
    if newer_than is not None:
        found = [(step, path) for step, path in found if step > newer_than and path.name.count(".") == 1]
    return [path for _, path in sorted(found)]


def remove_unfinished_saves(root: Path) -> None:
    """Before a save (rank 0): delete what killed saves and deletions left behind."""
    for path in unfinished_saves(root):
        shutil.rmtree(path, ignore_errors=True)
