"""The gloo harness itself: ranks run, results come back, failures surface with the rank's traceback."""

import os

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

from keye_train.distributed.parallel_dims import ParallelDims

pytestmark = pytest.mark.dist


def _sum_ranks(rank, world_size):
    from keye_train.testing import rank_preload

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    dims = ParallelDims(world_size=world_size, tp=2)
    return {
        "sum": t.item(),
        "coords": dims.rank_coordinates,
        "dp": dims.dp,
        "forked_preloaded": os.getppid() == rank_preload.SERVER_PID,
    }


def _fail(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def test_ranks_communicate_and_mesh_coordinates_are_consistent():
    results = run_ranks(_sum_ranks, world_size=4)
    assert [r["sum"] for r in results] == [6.0] * 4
    assert [r["coords"]["tp"] for r in results] == [0, 1, 0, 1]
    assert [r["coords"]["dp_shard"] for r in results] == [0, 0, 1, 1]
    assert {r["dp"] for r in results} == {2}
    # Forked from the harness's server after its imports (a preload that failed to import would fork
    # ranks that import everything again, silently: ~4 CPU-s each).
    assert all(r["forked_preloaded"] for r in results)


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RuntimeError, match="rank one is broken"):
        run_ranks(_fail, world_size=2, timeout_s=60)
