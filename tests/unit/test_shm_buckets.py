"""The same-host weight transport's two sides (megacredit/rollout/shm_buckets.py) on real files in
/dev/shm, and the choice between it and the broadcast (``server_sync_backend``)."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from megacredit.rollout.shm_buckets import ShmBucketFile, is_this_host, read_shm_bucket
from megacredit.rollout.vllm_server import server_sync_backend


def _pairs(scale: float = 1.0):
    generator = torch.Generator().manual_seed(0)
    fused = torch.randn(6, 4, generator=generator) * scale
    return [
        ("a.weight", torch.randn(5, 3, generator=generator) * scale),
        ("q.weight", fused.view(3, 2, 4)[:, :1].reshape(3, 4)),       # a copy of a strided view
        ("k.weight", fused.view(3, 2, 4)[:, 1]),                      # strided, not copied
        ("norm.weight", (torch.randn(7, generator=generator) * scale).to(torch.bfloat16)),
        ("step", torch.tensor([3, 1, 4], dtype=torch.int64)),
    ]


def test_a_bucket_comes_back_bitwise_and_the_file_is_removed(tmp_path):
    shm = ShmBucketFile(directory=tmp_path, prefix="test")
    pairs = _pairs()
    spec = json.loads(json.dumps(shm.write(pairs)))  # what travels through /collective_rpc
    path = shm.path
    assert path is not None and path.is_file() and path.stat().st_size == spec["size"]
    back = read_shm_bucket(spec)
    assert [n for n, _ in back] == [n for n, _ in pairs]
    for (name, got), (_, expected) in zip(back, pairs):
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got, expected), name
        assert got.data_ptr() % 64 == 0, name  # every dtype viewed in place
    shm.close()
    assert not path.exists() and list(tmp_path.iterdir()) == []
    shm.close()  # idempotent


def test_the_file_is_reused_and_grown_then_replaced(tmp_path):
    shm = ShmBucketFile(directory=tmp_path, prefix="test")
    shm.write(_pairs())
    first = shm.path
    small = shm.write(_pairs()[:1])
    assert shm.path == first  # a smaller bucket reuses the file
    assert torch.equal(read_shm_bucket(small)[0][1], _pairs()[0][1])
    big = [("big", torch.arange(10_000, dtype=torch.float32))]
    spec = shm.write(big)
    assert shm.path != first and not first.exists()  # grown: a new file, the old one removed
    assert torch.equal(read_shm_bucket(spec)[0][1], big[0][1])
    shm.close()
    assert list(tmp_path.iterdir()) == []


def test_the_reader_refuses_a_missing_file_a_wrong_size_and_an_entry_outside(tmp_path):
    shm = ShmBucketFile(directory=tmp_path, prefix="test")
    spec = shm.write(_pairs())
    with pytest.raises(ValueError, match="the spec says"):
        read_shm_bucket({**spec, "size": spec["size"] + 64})
    outside = [[*spec["tensors"][0][:3], spec["size"]]]
    with pytest.raises(ValueError, match="lies outside"):
        read_shm_bucket({**spec, "tensors": outside})
    shm.close()
    with pytest.raises(FileNotFoundError, match="rollout.sync_transport=broadcast"):
        read_shm_bucket(spec)


def _unassigned_address() -> str:
    """A TEST-NET-1 address (RFC 5737): never one of this host's own."""
    return "192.0.2.1"


def test_this_host_is_told_from_others():
    assert is_this_host("http://127.0.0.1:8000") and is_this_host("http://localhost:8000")
    assert not is_this_host(f"http://{_unassigned_address()}:8000")
    assert not is_this_host("http://no-such-host.invalid:8000")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # this host's own route address
        sock.connect((_unassigned_address(), 9))
        own = sock.getsockname()[0]
    assert is_this_host(f"http://{own}:8000")


@pytest.mark.parametrize("transport,remote,cuda,backend", [
    ("auto", False, False, "shm"),
    ("auto", True, False, "gloo"),
    ("auto", False, True, "nccl"),
    ("broadcast", False, False, "gloo"),
    ("shm", True, False, "shm"),
])
def test_the_transport_is_shm_only_for_cpu_servers_all_on_this_host(transport, remote, cuda, backend):
    urls = ["http://127.0.0.1:8000"] + ([f"http://{_unassigned_address()}:8000"] if remote else [])
    assert server_sync_backend(transport, urls, cuda) == backend
