"""Weight-sync measurement: the in-flight byte tracker and the sync/ metrics."""

from __future__ import annotations

import pytest
import torch

from megacredit.utils.sync_stats import (
    SYNC_METRICS,
    InFlightBytes,
    SyncMeter,
    reduce_sync_metrics,
    sync_metrics,
)


def test_tracker_counts_storages_once_and_releases_them():
    tracker = InFlightBytes()
    big = tracker.track(torch.zeros(1000))  # 4000 bytes
    view = tracker.track(big[10:20])  # same storage: not counted again
    assert tracker.current == 4000
    small = tracker.track(torch.zeros(10, dtype=torch.float16))
    assert (tracker.current, tracker.peak) == (4020, 4020)
    del big
    assert tracker.current == 4020  # the view keeps the storage alive, and counted
    del view
    assert tracker.current == 20
    del small
    assert (tracker.current, tracker.peak) == (0, 4020)
    assert tracker.track(torch.empty(5, device="meta")).device.type == "meta" and tracker.current == 0


def test_meter_counts_bucket_bytes_and_time():
    meter = SyncMeter()
    buckets = [[("a", torch.zeros(4)), ("b", torch.zeros(2, dtype=torch.bfloat16))], {"c": torch.zeros(3)}]
    for bucket in meter.count(iter(buckets)):
        meter.tracker.track(torch.zeros(8))
    metrics = meter.metrics()
    assert set(metrics) == set(SYNC_METRICS)
    assert metrics["sync/bytes"] == 16 + 4 + 12
    assert metrics["sync/seconds"] > 0
    assert metrics["sync/gb_per_s"] == pytest.approx(32 / 1e9 / metrics["sync/seconds"])
    assert metrics["sync/peak_extra_gb"] == pytest.approx(32 / 1e9)


def test_reduce_sums_bytes_and_takes_the_slowest_rank():
    ranks = [sync_metrics(4_000_000_000, 2.0, 1_000_000_000), sync_metrics(2_000_000_000, 4.0, 3_000_000_000), {}]
    merged = reduce_sync_metrics(ranks)
    assert merged == {"sync/bytes": 6e9, "sync/seconds": 4.0, "sync/gb_per_s": 1.5, "sync/peak_extra_gb": 3.0}
    assert reduce_sync_metrics([{}, {}]) == {}
    assert sync_metrics(10, 0.0, 0)["sync/gb_per_s"] == 0.0
