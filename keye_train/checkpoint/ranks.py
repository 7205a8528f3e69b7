"""Rank helpers of the checkpoint code, valid with or without a process group (one process: rank 0 of 1).

This rank, the world size, a barrier, and fn() run on rank 0 with its result (or its ValueError)
broadcast to every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, its result (or its ValueError) broadcast: one rank reads and hashes a checkpoint,
    every rank acts alike, and none waits forever for a rank 0 that failed."""
    box: list[Any] = [None]
    if _rank() == 0:
        try:
            box = [(True, fn())]
        except ValueError as err:
            box = [(False, str(err))]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise ValueError(value)
    return value
