"""Storages released and restored (megacredit.utils.storage_stash): empty while released, the
bytes counted independently, and bit-identical after a restore (exact by design: byte copies
through a file on a CPU)."""

import pytest
import torch

from megacredit.utils.storage_stash import StorageStash, host_copy, unique_storages


def _state():
    """A module's parameters, a buffer seen through two views, and a separate tensor."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    buffer = torch.randn(1000)
    views = [buffer[:300].view(10, 30), buffer[300:]]
    moments = torch.randn(48, 64, dtype=torch.float64)
    return layer, buffer, views, moments


def test_views_of_one_buffer_count_once_and_exclusions_are_left_out():
    layer, buffer, views, moments = _state()
    storages = unique_storages([layer.weight, layer.bias, *views, moments, layer.weight])
    assert [s.nbytes() for s in storages] == [48 * 64 * 4, 48 * 4, 1000 * 4, 48 * 64 * 8]
    rest = unique_storages([buffer, moments], exclude=unique_storages(views))
    assert [s.nbytes() for s in rest] == [48 * 64 * 8]


def test_release_empties_every_storage_and_restore_brings_the_bytes_back():
    layer, buffer, views, moments = _state()
    inputs = torch.randn(5, 64)
    before = [t.clone() for t in (layer.weight, layer.bias, buffer, moments)]
    output_before = layer(inputs)
    stash = StorageStash(unique_storages([layer.weight, layer.bias, *views, moments]))
    assert stash.release() == (48 * 64 + 48 + 1000) * 4 + 48 * 64 * 8
    assert stash.released
    assert all(t.untyped_storage().nbytes() == 0 for t in (layer.weight, layer.bias, buffer, moments, *views))
    stash.restore()
    for got, want in zip((layer.weight, layer.bias, buffer, moments), before):
        assert torch.equal(got, want)
    assert torch.equal(views[0], buffer[:300].view(10, 30))  # the views see the restored buffer
    torch.testing.assert_close(layer(inputs), output_before, rtol=0, atol=0)
    stash.restore()  # nothing released: no-op


def test_storages_not_kept_come_back_zeroed_and_a_second_cycle_works():
    layer, buffer, views, moments = _state()
    weight = layer.weight.detach().clone()
    stash = StorageStash(unique_storages([layer.weight, buffer]), keep=[True, False])
    for _ in range(2):  # a storage once released must stay resizable (no numpy view pins it)
        stash.release()
        stash.restore()
        assert torch.equal(layer.weight, weight)
        assert torch.equal(buffer, torch.zeros(1000))
    with pytest.raises(ValueError, match="keep flags"):
        StorageStash(unique_storages([layer.weight]), keep=[True, False])


def test_releasing_twice_without_a_restore_is_refused():
    layer, *_ = _state()
    stash = StorageStash(unique_storages([layer.weight]))
    stash.release()
    with pytest.raises(RuntimeError, match="already released"):
        stash.release()
    stash.restore()


def test_host_copy_is_a_separate_copy_in_the_asked_dtype():
    source = torch.randn(7, 3, dtype=torch.bfloat16)
    copy = host_copy(source, torch.float32)
    assert copy.dtype == torch.float32 and torch.equal(copy, source.float())
    assert copy.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
    assert torch.equal(host_copy(source), source)
