"""Small collectives (sum / max / gather of scalars and small tensors) over a named mesh dimension.

Every scalar exchange of the trainer, the steps, the ViT router and the metrics goes through here, so the
tensors are always on the device the backend needs: NCCL rejects CPU tensors, gloo CUDA ones. On CUDA the
default group is `cpu:gloo,cuda:nccl` (`init_distributed`), so object collectives and CPU metadata keep
working, but the numeric ones here still run on the GPU: one backend, one stream order with the model's
own collectives. Outside a process group (a single process) every call is the identity, so callers never
branch on the world size.

`over` names a ParallelDims mesh dimension or flattened view: pp, dp_replicate, dp_shard, cp, tp, dp,
dp_shard_cp, dp_cp, world.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from keye_train.distributed.parallel_dims import ParallelDims


def backend_device(dims: ParallelDims) -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, the CPU under gloo."""
    if dims.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group(dims: ParallelDims, over: str) -> dist.ProcessGroup | None:
    """The process group of `over`; None when there is nothing to communicate (size 1 or no group)."""
    if not dist.is_initialized() or dims.world_size == 1:
        return None
    if over == "world":
        return dist.group.WORLD
    mesh = dims.submesh(over)
    return mesh.get_group() if mesh.size() > 1 else None


def all_reduce_(dims: ParallelDims, tensor: Tensor, *, over: str, op: str = "sum") -> Tensor:
    """In-place sum or max of `tensor` over `over`, moved to the backend's device and back if needed."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op={op!r} must be one of {sorted(ops)}")
    group = _group(dims, over)
    if group is None:
        return tensor
    device = backend_device(dims)
    work = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(work, op=ops[op], group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def sum_scalars(dims: ParallelDims, values: Sequence[float], *, over: str) -> list[float]:
    """Element-wise sum of a few numbers over `over` (float64: counts stay exact)."""
    out = torch.tensor(list(values), dtype=torch.float64, device=backend_device(dims))
    return all_reduce_(dims, out, over=over).tolist()


def max_scalars(dims: ParallelDims, values: Sequence[float], *, over: str) -> list[float]:
    """Element-wise max of a few numbers over `over`."""
    out = torch.tensor(list(values), dtype=torch.float64, device=backend_device(dims))
    return all_reduce_(dims, out, over=over, op="max").tolist()


def gather_scalars(dims: ParallelDims, value: float, *, over: str = "world") -> list[float]:
    """One number from every rank of `over`, in that group's rank order."""
    group = _group(dims, over)
    if group is None:
        return [float(value)]
    device = backend_device(dims)
    mine = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [t.item() for t in out]


def gather_objects(dims: ParallelDims, obj: object, *, over: str = "world") -> list[object]:
    """A small picklable object from every rank of `over` (metadata such as grid lists), in rank order.

    Runs on the CPU side of the process group (gloo under `cpu:gloo,cuda:nccl`), so no device copy."""
    group = _group(dims, over)
    if group is None:
        return [obj]
    out: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def rank_in(dims: ParallelDims, *, over: str = "world") -> int:
    """This rank's index inside `over` (0 without a process group)."""
    group = _group(dims, over)
    return 0 if group is None else dist.get_rank(group)


def size_of(dims: ParallelDims, *, over: str = "world") -> int:
    """The number of ranks in `over` (1 without a process group)."""
    group = _group(dims, over)
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_group_(tensor: Tensor, *, group: dist.ProcessGroup | None, op: str = "sum") -> Tensor:
    """In-place sum / max over an explicit group (for callers that hold a group, not ParallelDims, such as
    the gradient-norm helpers); a CPU tensor is moved to the current CUDA device when the group's
    backend is NCCL only. The identity without a process group."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op={op!r} must be one of {sorted(ops)}")
    if not dist.is_initialized():
        return tensor
    work = tensor
    if tensor.device.type == "cpu" and dist.get_backend(group) == "nccl":
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(work, op=ops[op], group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_object_from_rank0(obj: object) -> object:
    """Rank 0's object on every rank of the default group (before a ParallelDims exists, e.g. the
    preflight verdict); under `cpu:gloo,cuda:nccl` object collectives take the gloo path. The identity
    without a process group."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
