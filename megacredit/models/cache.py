"""Build a cache folder once, safely: a file lock against concurrent builders and an atomic
rename so that a half-written folder is never visible under its final name."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock

COMPLETE_MARKER = ".megacredit-complete"


def default_cache_dir() -> Path:
    """``$MEGACREDIT_CACHE`` if set, else ``~/.cache/megacredit``."""
    return Path(os.environ.get("MEGACREDIT_CACHE", Path.home() / ".cache" / "megacredit"))


def is_complete(folder: Path) -> bool:
    """True when ``folder`` was finished by :func:`build_once` (its marker exists)."""
    return (folder / COMPLETE_MARKER).is_file()


def build_once(target: Path, build: Callable[[Path], None], lock_timeout_s: float = 1800) -> Path:
    """Return ``target``, building it first with ``build(tmp_dir)`` if it does not exist.

    ``build`` writes into a fresh temporary folder beside ``target``; only after it returns
    is a completion marker written and the folder renamed to ``target`` (atomic on one file
    system). A lock file serialises concurrent callers (other processes wait, then find the
    finished folder). A failed build leaves no ``target`` and removes its temporary folder.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=lock_timeout_s):
        if is_complete(target):
            return target
        if target.exists():  # not ours (no marker): refuse to overwrite or use it
            raise FileExistsError(
                f"{target} exists but was not completed by megacredit (no {COMPLETE_MARKER}); "
                f"delete it and retry"
            )
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp_dir)
            (tmp_dir / COMPLETE_MARKER).write_text("ok\n")
            os.rename(tmp_dir, target)
        finally:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir, ignore_errors=True)
    return target
