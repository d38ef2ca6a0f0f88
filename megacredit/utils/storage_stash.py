"""Tensor storages emptied and refilled, their bytes held off the device in between.

:class:`StorageStash` frees the memory of a set of tensor storages and brings it back, bytes
unchanged. ``release()`` copies each kept storage's bytes off the device, then resizes the
storage to 0 bytes: the memory is freed while every tensor viewing it (a parameter, a
``main_grad`` view into a DDP buffer, an optimizer moment) stays a valid object, as Megatron-Core's
own ``_ParamAndGradBuffer.offload_to_cpu`` does for gradient buffers. ``restore()`` resizes the
storages back and copies the bytes in. Copies only, no arithmetic: what comes back is
bit-identical. Storages not kept (``keep=False``: e.g. gradient buffers, zeroed before every
accumulation) come back zero-filled.

Where the bytes go: pinned host memory when the storages are on a GPU; on a CPU the memory being
freed IS host memory, so the bytes go to an unnamed temporary file (``$TMPDIR``) and the freed
heap memory is handed back to the kernel (glibc ``malloc_trim``, the CPU's counterpart of
``torch.cuda.empty_cache``). The same code path runs on both; on a CPU it is what the tests run.

:func:`host_copy` is the one-tensor form: a copy in host memory (pinned next to a GPU).
"""

from __future__ import annotations

import ctypes
import tempfile
from typing import Iterable, Sequence

import torch

from megacredit.utils.malloc import return_freed_memory

FILE_CHUNK_BYTES = 256 * 2**20
"""Bytes per read/write call of the CPU file store (a single call may move less than asked)."""


def host_copy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of ``tensor`` (cast to ``dtype``) in host memory, pinned when ``tensor`` is on a
    GPU so that copies back and forth run at full bus speed."""
    copy = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, pin_memory=tensor.device.type == "cuda")
    copy.copy_(tensor.detach())
    return copy


def unique_storages(tensors: Iterable[torch.Tensor], exclude: Iterable[torch.UntypedStorage] = ()) -> list:
    """The distinct non-empty storages behind ``tensors`` (views of one buffer count once),
    leaving out those of ``exclude``."""
    seen = {_key(storage) for storage in exclude}
    found = []
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() and _key(storage) not in seen:
            seen.add(_key(storage))
            found.append(storage)
    return found


def _key(storage: torch.UntypedStorage) -> tuple[str, int]:
    return str(storage.device), storage.data_ptr()


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _memory_of(data: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU uint8 tensor as a writable memoryview. Not through
    ``Tensor.numpy()``, which marks the storage non-resizable for good (torch's
    tensor_numpy.cpp), so it could never be released again."""
    return memoryview((ctypes.c_ubyte * data.numel()).from_address(data.data_ptr())).cast("B")


class _FileStore:
    """CPU storages' bytes in an unnamed temporary file (deleted when closed)."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="megacredit-released-")
        self.offsets: list[int] = []

    def put(self, data: torch.Tensor) -> None:
        self.offsets.append(self.file.tell())
        view = _memory_of(data)
        for start in range(0, len(view), FILE_CHUNK_BYTES):
            self.file.write(view[start:start + FILE_CHUNK_BYTES])

    def get(self, index: int, data: torch.Tensor) -> None:
        self.file.seek(self.offsets[index])
        view, done = _memory_of(data), 0
        while done < len(view):
            read = self.file.readinto(view[done:done + FILE_CHUNK_BYTES])
            if not read:
                raise OSError(f"the released bytes' file ended {len(view) - done} bytes early")
            done += read

    def close(self) -> None:
        self.file.close()


class _PinnedStore:
    """GPU storages' bytes in pinned host memory (copies issued asynchronously, then waited for)."""

    def __init__(self) -> None:
        self.copies: list[torch.Tensor] = []

    def put(self, data: torch.Tensor) -> None:
        copy = torch.empty(data.numel(), dtype=torch.uint8, pin_memory=True)
        copy.copy_(data, non_blocking=True)
        self.copies.append(copy)

    def get(self, index: int, data: torch.Tensor) -> None:
        data.copy_(self.copies[index], non_blocking=True)

    def close(self) -> None:
        self.copies = []


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _return_freed(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        return_freed_memory()


class StorageStash:
    """Storages released together and restored together (see the module docstring)."""

    def __init__(self, storages: Sequence[torch.UntypedStorage], keep: Sequence[bool] | None = None) -> None:
        self.storages = list(storages)
        self.keep = [True] * len(self.storages) if keep is None else list(keep)
        if len(self.keep) != len(self.storages):
            raise ValueError(f"StorageStash: {len(self.keep)} keep flags for {len(self.storages)} storages")
        self.sizes = [storage.nbytes() for storage in self.storages]
        self.device = self.storages[0].device if self.storages else torch.device("cpu")
        self._store: _FileStore | _PinnedStore | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the storages hold when resident (what a release frees)."""
        return sum(self.sizes)

    @property
    def released(self) -> bool:
        return self._store is not None

    def release(self) -> int:
        """Copy the kept storages' bytes off the device and free every storage; returns the bytes freed."""
        if self.released:
            raise RuntimeError("StorageStash.release: already released (restore first)")
        store = _FileStore() if self.device.type == "cpu" else _PinnedStore()
        for storage, keep in zip(self.storages, self.keep):
            if keep:
                store.put(_bytes_of(storage))
        _synchronize(self.device)
        for storage in self.storages:
            storage.resize_(0)
        self._store = store
        _return_freed(self.device)
        return self.nbytes

    def restore(self) -> None:
        """Re-allocate every storage and copy its bytes back (zeros for the storages not kept)."""
        if not self.released:
            return
        store, kept = self._store, 0
        for storage, size, keep in zip(self.storages, self.sizes, self.keep):
            storage.resize_(size)
            if keep:
                store.get(kept, _bytes_of(storage))
                kept += 1
            else:
                _bytes_of(storage).zero_()
        _synchronize(self.device)
        store.close()
        self._store = None
