"""Measure a weight sync: bytes sent, wall time, and the peak memory its own buffers held.

Megatron-free (the Megatron exporter and the rollout engines both use it; the trainer logs
what it returns). Usage on every rank that takes part in a sync::

    meter = SyncMeter()
    for bucket in meter.count(iter_hf_weight_buckets(..., tracker=meter.tracker)):
        engine.load_weights(bucket)
        del bucket                      # drop it before asking for the next one
    local = meter.metrics()             # this rank's sync/* figures
    metrics = reduce_sync_metrics(all_gather_objects(local))   # the job's

``InFlightBytes`` counts the bytes of the tensors the export allocated (gathered TP shards,
received buffers, the yielded HF tensors) for as long as any of them is alive, keyed by
storage so that views are not counted twice; its ``peak`` is what ``sync/peak_extra_gb``
reports. It is exact for the tensors it is told about and blind to copies made elsewhere
(e.g. inside an engine's own ``load_weights``).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

GB = 1e9  # sync/* metrics use decimal gigabytes
SYNC_METRICS = ("sync/bytes", "sync/seconds", "sync/gb_per_s", "sync/peak_extra_gb")

Bucket = TypeVar("Bucket")


class InFlightBytes:
    """Bytes of tracked tensors alive right now (``current``) and at most so far (``peak``)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._storages: dict[tuple[str, int], list[int]] = {}  # key -> [nbytes, live tensors]

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count ``tensor``'s storage until every tracked tensor on it is garbage; returns it."""
        if tensor.device.type == "meta":
            return tensor
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        with self._lock:
            entry = self._storages.get(key)
            if entry is None:
                entry = self._storages[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
        weakref.finalize(tensor, self._release, key)
        return tensor

    def _release(self, key: tuple[str, int]) -> None:
        with self._lock:
            entry = self._storages[key]
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self._storages[key]


def track(tracker: InFlightBytes | None, tensor: torch.Tensor) -> torch.Tensor:
    """``tracker.track(tensor)``, or ``tensor`` unchanged when there is no tracker."""
    return tensor if tracker is None else tracker.track(tensor)


def sync_metrics(num_bytes: int, seconds: float, peak_extra_bytes: int) -> dict[str, float]:
    """The four ``sync/`` metrics from raw figures (GB = 1e9 bytes)."""
    return {
        "sync/bytes": float(num_bytes),
        "sync/seconds": float(seconds),
        "sync/gb_per_s": num_bytes / GB / seconds if seconds > 0 else 0.0,
        "sync/peak_extra_gb": peak_extra_bytes / GB,
    }


def reduce_sync_metrics(per_rank: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine ranks' ``SyncMeter.metrics()``: bytes summed (each rank counted what it sent or
    received), seconds and peak memory maximal, throughput = total bytes / slowest rank."""
    parts = [part for part in per_rank if part]
    if not parts:
        return {}
    total = sum(part["sync/bytes"] for part in parts)
    seconds = max(part["sync/seconds"] for part in parts)
    peak = max(part["sync/peak_extra_gb"] for part in parts)
    return sync_metrics(int(total), seconds, int(round(peak * GB)))


class SyncMeter:
    """Times one sync, counts the bytes of the buckets it sees, owns the memory tracker."""

    def __init__(self) -> None:
        self.tracker = InFlightBytes()
        self.num_bytes = 0
        self.seconds = 0.0
        self._start: float | None = None

    def start(self) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def add_bytes(self, num_bytes: int) -> None:
        self.num_bytes += int(num_bytes)

    def count(self, buckets: Iterable[Bucket]) -> Iterator[Bucket]:
        """Pass ``buckets`` through, adding their bytes; the clock runs from the first request
        to exhaustion (so it includes the consumer's own work on each bucket)."""
        self.start()
        try:
            for bucket in buckets:
                tensors = bucket.values() if isinstance(bucket, Mapping) else (t for _, t in bucket)
                self.add_bytes(sum(t.numel() * t.element_size() for t in tensors))
                yield bucket
                del bucket
        finally:
            self.stop()

    def metrics(self) -> dict[str, float]:
        return sync_metrics(self.num_bytes, self.seconds, self.tracker.peak)
