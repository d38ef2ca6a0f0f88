"""Same-host weight transport: a bucket crosses to a server's worker through one file in /dev/shm.

A vLLM server on the trainer's host needs no network for its weights: the trainer copies each
bucket once into a shared-memory file (:class:`ShmBucketFile`, created by the trainer with a name
unique to its process and the update, and removed by it when the update finishes or fails) and the
server's worker maps the same file (:func:`read_shm_bucket`, a read-only private mapping: the
pages are the file's own, nothing is copied) and loads the tensors from it. Two copies of every
byte (into the file, out of it into the engine) where a broadcast over TCP loopback moves it
through the kernel's socket buffers (about 1/50 of a memcpy measured here,
benchmarks/results/weight_sync.json).

The file's layout is described in the spec the trainer sends with each bucket (a JSON-able dict:
``path``, ``size`` in bytes, and per tensor ``[name, dtype, shape, offset]``, offsets aligned to
``ALIGN`` bytes so every dtype can be viewed in place). The file is reused by the buckets of one
update (grown when a bucket is larger) and removed by :meth:`ShmBucketFile.close`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch

from megacredit.rollout.base import NamedTensor

SHM_DIR = Path("/dev/shm")
ALIGN = 64
PREFIX = "megacredit-weights"


def is_this_host(url: str) -> bool:
    """Whether the server at ``url`` runs on this host: its address is a loopback one or one
    this host can bind (an address of its own interfaces; a server in another network
    namespace or machine is not). A name that does not resolve counts as another host."""
    from urllib.parse import urlsplit  # noqa: PLC0415

    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, address in infos:
        if ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address[0], 0))
            except OSError:
                return False
    return bool(infos)


def shm_layout(pairs: Sequence[NamedTensor]) -> tuple[list[list[Any]], int]:
    """Per tensor ``[name, dtype, shape, offset]`` in a file of the returned size (bytes)."""
    entries, offset = [], 0
    for name, tensor in pairs:
        entries.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset])
        offset += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    return entries, offset


def _views(buffer: torch.Tensor, entries: Sequence[Sequence[Any]]) -> list[NamedTensor]:
    """The tensors ``entries`` describe, as views into the uint8 ``buffer``."""
    out = []
    for name, dtype_name, shape, offset in entries:
        dtype = getattr(torch, dtype_name)
        size = torch.Size(shape)
        nbytes = size.numel() * dtype.itemsize
        if offset % ALIGN or offset + nbytes > buffer.numel():
            raise ValueError(f"shm bucket: '{name}' ({nbytes} bytes at {offset}) lies outside the "
                             f"{buffer.numel()}-byte file or off the {ALIGN}-byte alignment")
        out.append((name, buffer[offset:offset + nbytes].view(dtype).view(size)))
    return out


class ShmBucketFile:
    """The trainer's side: one file in ``directory`` that buckets are written into; the file is
    created on the first write and grown (a new file) when a bucket is larger. Call
    :meth:`close` in a ``finally``: it removes the file (a server that died mid-update leaves
    nothing behind)."""

    def __init__(self, directory: Path = SHM_DIR, prefix: str = PREFIX) -> None:
        self.directory, self.prefix = Path(directory), prefix
        self.path: Path | None = None
        self._buffer: torch.Tensor | None = None

    def write(self, pairs: Sequence[NamedTensor]) -> dict[str, Any]:
        """Copy ``pairs`` into the file (one copy per byte, straight from the given tensors,
        casting nothing); returns the spec :func:`read_shm_bucket` reads them back from."""
        entries, size = shm_layout(pairs)
        if self._buffer is None or self._buffer.numel() < size:
            self.close()
            self.path = self.directory / f"{self.prefix}-{os.getpid()}-{uuid.uuid4().hex}"
            self._buffer = torch.from_file(str(self.path), shared=True, size=max(size, 1), dtype=torch.uint8)
        for (_, target), (_, tensor) in zip(_views(self._buffer, entries), pairs):
            target.copy_(tensor)
        return {"path": str(self.path), "size": int(self._buffer.numel()), "tensors": entries}

    def close(self) -> None:
        """Unmap and remove the file (idempotent)."""
        self._buffer = None
        path, self.path = self.path, None
        if path is not None:
            path.unlink(missing_ok=True)


def read_shm_bucket(spec: dict[str, Any]) -> list[NamedTensor]:
    """The worker's side: map the file of ``spec`` read-only (a private mapping: no copy) and
    return its tensors as views. A file that is absent or of another size raises
    ``FileNotFoundError`` / ``ValueError`` (a server that does not share this host's /dev/shm)."""
    path, size = Path(spec["path"]), int(spec["size"])
    if not path.is_file():
        raise FileNotFoundError(
            f"shm bucket {path} is not visible here: this server does not share the trainer's /dev/shm "
            f"(another host or container); set rollout.sync_transport=broadcast")
    if path.stat().st_size != size:
        raise ValueError(f"shm bucket {path} has {path.stat().st_size} bytes, the spec says {size}")
    buffer = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    return _views(buffer, spec["tensors"])
