"""The collectives helper: tensors on the backend's device, sums/max/gathers over named mesh dimensions, and
no torch.distributed collective called directly anywhere in keye_train/train/."""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import keye_train.train
from keye_train.distributed import collectives
from keye_train.distributed.parallel_dims import (
    ParallelDims,
    init_distributed,
    local_rank_from_env,
    process_group_backend,
)

# torch.distributed's collectives and point-to-point calls (functional and object forms included).
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
}


def _direct_collectives(path: Path) -> list[str]:
    """`dist.all_reduce(...)`-style calls through any alias of torch.distributed (or its nn.functional)."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed", "torch.distributed.nn.functional"}
    names: set[str] = set()
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in aliases:
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module in aliases:
            imported |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in imported:
            hits.append(f"{path.name}:{node.lineno} {func.id}")
        elif isinstance(func, ast.Attribute) and func.attr in COLLECTIVES:
            owner = ast.unparse(func.value)
            if owner in names or owner in ("torch.distributed", "dist"):
                hits.append(f"{path.name}:{node.lineno} {owner}.{func.attr}")
    return hits


def test_train_package_calls_no_collective_directly():
    files = sorted(Path(keye_train.train.__file__).parent.glob("*.py"))
    assert len(files) > 5
    hits = [hit for path in files for hit in _direct_collectives(path)]
    assert not hits, f"use keye_train/distributed/collectives.py instead: {hits}"


def test_the_scan_finds_a_direct_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch.distributed as d\nfrom torch.distributed import all_gather\n"
        "def f(t):\n    d.all_reduce(t)\n    all_gather([t], t)\n"
    )
    assert len(_direct_collectives(bad)) == 2


def test_the_backend_device_follows_the_process_group_backend(monkeypatch):
    assert collectives.backend_device(ParallelDims(world_size=1)) == torch.device("cpu")
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"
    # Under NCCL the helper's tensors go to the current CUDA device (checked without a GPU).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.backend_device(ParallelDims(world_size=1, device_type="cuda")) == torch.device(
        "cuda", 3
    )


def test_cuda_init_sets_the_local_rank_device_before_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert init_distributed(device_type="cuda") == 1
    assert calls == [("set_device", 1), ("init", "cpu:gloo,cuda:nccl")]
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert local_rank_from_env() == 5
    calls.clear()
    with pytest.raises(RuntimeError, match="local rank 5 has no GPU"):
        init_distributed(device_type="cuda")


def test_a_single_process_needs_no_group():
    dims = ParallelDims(world_size=1)
    assert collectives.sum_scalars(dims, [1.5, 2.0], over="dp") == [1.5, 2.0]
    assert collectives.max_scalars(dims, [3.0], over="world") == [3.0]
    assert collectives.gather_scalars(dims, 4.0) == [4.0]
    assert collectives.gather_objects(dims, {"a": 1}) == [{"a": 1}]
    assert collectives.rank_in(dims) == 0 and collectives.size_of(dims) == 1
    with pytest.raises(ValueError, match="op='min'"):
        collectives.all_reduce_(dims, torch.zeros(1), over="world", op="min")
