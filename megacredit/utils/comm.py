"""Small object collectives over the world group (identity in a single process)."""

from __future__ import annotations

from typing import Any

import torch


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from global rank ``src`` on every rank."""
    if _world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, ordered by global rank."""
    if _world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * _world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
