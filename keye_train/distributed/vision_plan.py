"""The planning half of the heterogeneous ViT (`vision.py` routes by it): what the work is and who does it.

The visual items of a global batch (images and video frames, the unit of ViT work) with the ranks that
consume each one, the pluggable cost model and assignment that place every item on one encoding rank, and
the report of how the step's work was spread. No communication: every rank computes the same plan from the
same items.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch.distributed as dist
from torch import Tensor

from keye_train.distributed.parallel_dims import MESH_DIMS, ParallelDims

CostFn = Callable[["VisualItem"], float]
# (costs of the items, world size) -> the rank that encodes each item
AssignFn = Callable[[Sequence[float], int], list[int]]


@dataclass(frozen=True)
class VisualItem:
    """One image or one video frame of the global batch: the unit of ViT work (attention never crosses it)."""

    grid_hw: tuple[int, int]  # patch grid
    consumers: tuple[int, ...]  # ranks (of the router's group, the world by default) that splice it
    # How many consumers return the same full gradient (TP peers: the decoder input is replicated over
    # tp); their sum is divided by it. CP peers each return the gradient of their own slice: summed as is.
    grad_copies: int = 1

    @property
    def num_patches(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]


def visual_items(grid_thw: Tensor, *, consumers: Sequence[int], grad_copies: int) -> list[VisualItem]:
    """Items of one DP replica's batch in placeholder order; a (t, h, w) video becomes t frames.

    grad_copies: how many of the consumers return identical gradients (the tp degree for stage-0 ranks)."""
    item = VisualItem(grid_hw=(0, 0), consumers=tuple(consumers), grad_copies=grad_copies)
    return [replace(item, grid_hw=(h, w)) for t, h, w in grid_thw.tolist() for _ in range(t)]


def frame_pixels(pixel_values: Tensor, grid_thw: Tensor) -> list[Tensor]:
    """The patches of every frame (image or video frame), in the order of `visual_items`."""
    sizes = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    return list(pixel_values.split(sizes))


def stage0_consumers(dims: ParallelDims) -> list[list[int]]:
    """For each DP replica (dp rank order), the global ranks of its pipeline stage 0 (all tp/cp peers;
    with pp=1 every rank of the replica)."""
    if dims.world_size == 1 and not dist.is_initialized():
        return [[0]]
    ranks = dims.mesh.mesh  # (pp, dp_replicate, dp_shard, cp, tp) global ranks
    assert tuple(dims.mesh.mesh_dim_names) == MESH_DIMS
    return ranks[0].reshape(dims.dp, dims.cp * dims.tp).tolist()


class PatchCost:
    """ViT cost of one item ~ FLOPs per layer: linear layers ~ 24 p d^2, attention ~ 4 p^2 d."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size

    def __call__(self, item: VisualItem) -> float:
        p = item.num_patches
        return float(p * (6 * self.hidden_size + p))


def greedy_longest_first(costs: Sequence[float], world_size: int) -> list[int]:
    """Most expensive item first, each onto the least-loaded rank (ties: lowest rank); deterministic, so
    every rank computes the same plan without communicating. A heap keeps it O(n log ranks) at 512 ranks."""
    loads = [(0.0, rank) for rank in range(world_size)]
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owner


@dataclass(frozen=True)
class VisualWorkReport:
    """How one step's visual work was spread over the world."""

    patches_per_rank: tuple[int, ...]
    items_per_rank: tuple[int, ...]
    cost_per_rank: tuple[float, ...]

    @property
    def max_cost(self) -> float:
        return max(self.cost_per_rank)

    @property
    def mean_cost(self) -> float:
        return sum(self.cost_per_rank) / len(self.cost_per_rank)

    @property
    def imbalance(self) -> float:
        """max / mean cost (1.0 is perfect balance; 1.0 too when there is no visual work)."""
        return self.max_cost / self.mean_cost if self.mean_cost > 0 else 1.0
