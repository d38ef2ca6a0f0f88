"""Flattened weight buckets: many named tensors as one contiguous 1-D tensor plus metadata.

This is the layout of SGLang's ``FlattenedTensorBucket`` (sgl-project/sglang,
``python/sglang/srt/weight_sync/tensor_bucket.py``: each tensor flattened, concatenated in
order, with ``name, shape, dtype, start_idx, end_idx, numel`` per tensor) and the layout its
``ModelRunner._update_bucketed_weights_from_distributed`` allocates and broadcasts into
(``python/sglang/srt/model_executor/model_runner.py``): so one ``torch.distributed.broadcast``
of :func:`flatten_tensors`' output fills an engine's whole bucket, and one CUDA-IPC handle
carries a bucket to a colocated engine. A bucket holds one dtype (``torch.cat`` would promote
mixed dtypes); :func:`split_by_dtype` cuts a mixed bucket first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from megacredit.rollout.base import NamedTensor


@dataclass(frozen=True)
class FlatTensorMeta:
    """Where one tensor lives in a flat bucket (the fields of SGLang's FlattenedTensorMetadata)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def split_by_dtype(named_tensors: Sequence[NamedTensor]) -> list[list[NamedTensor]]:
    """Group pairs by dtype, groups in order of first appearance, order kept inside a group."""
    groups: dict[torch.dtype, list[NamedTensor]] = {}
    for name, tensor in named_tensors:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return list(groups.values())


def flatten_tensors(named_tensors: Sequence[NamedTensor]) -> tuple[torch.Tensor, list[FlatTensorMeta]]:
    """One 1-D tensor (a copy, on the tensors' device) and the metadata to cut it back.

    All tensors must share one dtype and device; the result's dtype is that dtype."""
    if not named_tensors:
        raise ValueError("flatten_tensors: the bucket is empty")
    dtype, device = named_tensors[0][1].dtype, named_tensors[0][1].device
    for name, tensor in named_tensors:
        if tensor.dtype != dtype or tensor.device != device:
            raise ValueError(
                f"flatten_tensors: '{name}' is {tensor.dtype} on {tensor.device} but the bucket "
                f"is {dtype} on {device}; split the bucket with split_by_dtype first"
            )
    metadata = flat_metadata([name for name, _ in named_tensors], [t.shape for _, t in named_tensors], dtype)
    flat = torch.empty(metadata[-1].end_idx, dtype=dtype, device=device)
    for meta, (_, tensor) in zip(metadata, named_tensors):
        flat[meta.start_idx:meta.end_idx].view(meta.shape).copy_(tensor)  # strided sources: still one copy
    return flat, metadata


def flat_metadata(names: Sequence[str], shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> list[FlatTensorMeta]:
    """The metadata :func:`flatten_tensors` gives for tensors of these names and shapes (for a
    receiver that allocates the flat bucket from a description)."""
    metadata, start = [], 0
    for name, shape in zip(names, shapes, strict=True):
        size = torch.Size(shape)
        metadata.append(FlatTensorMeta(name, size, dtype, start, start + size.numel(), size.numel()))
        start += size.numel()
    return metadata


def unflatten_tensors(flat: torch.Tensor, metadata: Sequence[FlatTensorMeta]) -> list[NamedTensor]:
    """Inverse of :func:`flatten_tensors`: views into ``flat``, shaped and named as before."""
    if flat.dim() != 1:
        raise ValueError(f"unflatten_tensors: expected a 1-D tensor, got shape {tuple(flat.shape)}")
    end = metadata[-1].end_idx if metadata else 0
    if end != flat.numel():
        raise ValueError(f"unflatten_tensors: metadata covers {end} elements, the tensor has {flat.numel()}")
    out = []
    for meta in metadata:
        if meta.dtype != flat.dtype:
            raise ValueError(f"unflatten_tensors: '{meta.name}' is {meta.dtype}, the bucket {flat.dtype}")
        out.append((meta.name, flat[meta.start_idx:meta.end_idx].view(meta.shape)))
    return out
