"""The manifest of a checkpoint directory: every file's size, and a checksum of the small ones.

Written at save time into the completion marker (megacredit.megatron.checkpoint); a checkpoint
counts as intact only when its directory still holds every listed file with the listed size
(and, for files up to :data:`CHECKSUM_MAX_BYTES`, the listed SHA-256). This catches truncated
or missing shards (a full disk, a killed copy, a half-synced filesystem) and damaged metadata;
a bit flip inside a large shard keeps its size and is NOT caught (hashing every shard on each
resume would read the whole checkpoint).

Multi-rank saves: each rank writes its own shards into the shared directory. After the save
rank 0 lists the directory (with checksums) and every other rank compares that listing with its
own view (sizes only): a rank that sees a file rank 0 does not, or another size, means the
directory is not on a filesystem shared coherently by all ranks, which is reported instead of
writing a manifest that would not describe what every rank wrote.
Pure filesystem code: no torch, no Megatron.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

CHECKSUM_MAX_BYTES = 1 << 20
"""Files up to this size (1 MiB: common.pt, metadata.json, .metadata, small shards) get a SHA-256."""

FileEntry = dict  # {"size": int, "sha256": str (small files only)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(directory: str | Path, exclude: Sequence[str] = (), checksums: bool = True) -> dict[str, FileEntry]:
    """Relative path (POSIX) -> entry for every regular file under ``directory``;
    ``checksums=False`` records sizes only."""
    root = Path(directory)
    entries: dict[str, FileEntry] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if relative in exclude or not path.is_file():
                continue
            size = path.stat().st_size
            entry: FileEntry = {"size": size}
            if checksums and size <= CHECKSUM_MAX_BYTES:
                entry["sha256"] = _sha256(path)
            entries[relative] = entry
    return dict(sorted(entries.items()))


def listing_disagreement(reference: Mapping[str, FileEntry], own: Mapping[str, FileEntry]) -> str | None:
    """How this rank's view ``own`` (sizes) differs from rank 0's ``reference`` listing, or None."""
    for name in sorted(set(reference) | set(own)):
        if name not in reference:
            return f"sees {name}, which rank 0 does not"
        if name not in own:
            return f"does not see {name}, which rank 0 does"
        if own[name]["size"] != reference[name]["size"]:
            return f"sees {name} with {own[name]['size']} bytes, rank 0 with {reference[name]['size']}"
    return None


def manifest_problem(directory: str | Path, manifest: Mapping[str, FileEntry]) -> str | None:
    """Why ``directory`` does not match ``manifest`` (the first problem found), or None."""
    root = Path(directory)
    for name, entry in manifest.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']}"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None
