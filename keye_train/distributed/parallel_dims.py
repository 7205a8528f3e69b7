"""ParallelDims: validated parallel degrees and the one DeviceMesh every parallel component receives."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# Mesh dimension order, outermost first: PP outermost so its point-to-point traffic crosses nodes while
# TP (innermost) stays inside a node, as in Megatron and torchtitan.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
_FLATTENED = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
    "world": MESH_DIMS,
}


@dataclass
class ParallelDims:
    """Degrees of the LLM's parallelism; the ViT is data-parallel over the whole world.

    dp_shard=-1 takes whatever the other degrees leave of world_size. FSDP shards parameters over
    dp_shard x cp (CP ranks hold identical parameters), and replicates them over dp_replicate (HSDP).
    """

    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    device_type: str = "cpu"
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("pp", "dp_replicate", "cp", "tp"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"parallel.{name}={value} must be >= 1")
        others = self.pp * self.dp_replicate * self.cp * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(
                    f"world_size={self.world_size} is not divisible by pp*dp_replicate*cp*tp="
                    f"{self.pp}*{self.dp_replicate}*{self.cp}*{self.tp}={others}"
                )
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard} must be >= 1 (or -1 for auto)")
        if others * self.dp_shard != self.world_size:
            raise ValueError(
                f"pp*dp_replicate*dp_shard*cp*tp = {self.pp}*{self.dp_replicate}*{self.dp_shard}*{self.cp}*"
                f"{self.tp} = {others * self.dp_shard} != world_size={self.world_size}"
            )
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type={self.device_type!r} must be 'cpu' (gloo) or 'cuda' (nccl)")

    @classmethod
    def from_config(cls, cfg, *, world_size: int, device_type: str = "cpu") -> ParallelDims:
        """The degrees of a `parallel:` section (distributed/parallelize.py: ParallelConfig) on this world."""
        degrees = {name: getattr(cfg, name) for name in MESH_DIMS}
        return cls(world_size=world_size, device_type=device_type, **degrees)

    def validate_for_model(self, *, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        """Checks that need the LLM's shape: heads split over TP (and CP for Ulysses), layers over PP."""
        if num_kv_heads % self.tp:
            raise ValueError(f"parallel.tp={self.tp} does not divide the {num_kv_heads} KV heads")
        if num_heads % (self.tp * self.cp) or num_kv_heads % (self.tp * self.cp):
            raise ValueError(
                f"tp*cp={self.tp}*{self.cp} must divide the query heads ({num_heads}) and KV heads "
                f"({num_kv_heads}): Ulysses context parallelism spreads heads over tp*cp ranks"
            )
        if self.pp > num_layers:
            raise ValueError(f"parallel.pp={self.pp} exceeds the {num_layers} decoder layers")

    @property
    def backend(self) -> str:
        return process_group_backend(self.device_type)

    @property
    def dp(self) -> int:
        """Data-parallel degree of the LLM: how many different batches are consumed per step."""
        return self.dp_replicate * self.dp_shard

    @property
    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS}

    @property
    def mesh(self) -> DeviceMesh:
        """The world mesh (built once, on first use, after the process group is initialised)."""
        if self._mesh is None:
            self._mesh = self._build_mesh()
        return self._mesh

    def _build_mesh(self) -> DeviceMesh:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"ParallelDims was built for world_size={self.world_size} but the process group has "
                f"{dist.get_world_size()} ranks"
            )
        mesh = init_device_mesh(
            self.device_type, tuple(self.degrees.values()), mesh_dim_names=tuple(self.degrees)
        )
        # Flattened views used by FSDP (params sharded over dp_shard x cp; the ViT over the world), data
        # loading (dp) and the loss reduction (every rank that sees different tokens). Kept here: slicing a
        # flattened dimension back out of the root mesh is deprecated in torch.
        self._flat = {name: mesh[dims]._flatten(name) for name, dims in _FLATTENED.items()}
        return mesh

    def submesh(self, name: str) -> DeviceMesh:
        """A mesh dimension or flattened view: pp, dp_replicate, dp_shard, cp, tp, dp, dp_shard_cp, dp_cp,
        world."""
        mesh = self.mesh
        return self._flat[name] if name in self._flat else mesh[name]

    @cached_property
    def rank_coordinates(self) -> dict[str, int]:
        """This rank's coordinate along each mesh dimension (all 0 for a single process without a group)."""
        if self.world_size == 1 and not dist.is_initialized():
            return dict.fromkeys(MESH_DIMS, 0)
        return {name: self.mesh[name].get_local_rank() for name in MESH_DIMS}

    @property
    def is_pp_first_stage(self) -> bool:
        return self.rank_coordinates["pp"] == 0

    @property
    def is_pp_last_stage(self) -> bool:
        return self.rank_coordinates["pp"] == self.pp - 1

    @property
    def dp_rank(self) -> int:
        c = self.rank_coordinates
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.degrees.items() if v > 1]
        return f"world={self.world_size} " + (" x ".join(parts) if parts else "single process layout")


def shutdown_distributed(*, barrier: bool = True) -> None:
    """End of a run: wait for every rank (no peer still mid-collective), destroy the process groups, and
    free them while the interpreter is fully alive.

    destroy_process_group drops torch's own references, but DeviceMeshes and DTensors in reference cycles
    keep gloo's process group alive until interpreter finalisation, where its worker threads can abort the
    process ("terminate called without an active exception", exit -6, in a fraction of 2-rank gloo runs).
    Collecting right after the destroy frees it while Python can still run its destructors.
    """
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def local_rank_from_env() -> int:
    """This process's index on its node: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID (srun without
    torchrun), else 0 (a single process)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def world_size_from_env() -> int:
    """The launch's world size: torchrun's WORLD_SIZE, else Slurm's SLURM_NTASKS, else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


def process_group_backend(device_type: str) -> str:
    """gloo on CPU; on CUDA NCCL for CUDA tensors plus gloo for CPU ones (object collectives, metadata)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_distributed(*, device_type: str = "cpu") -> int:
    """Initialise the default process group from torchrun's (or Slurm's) environment; returns this rank.

    On CUDA the device is chosen from the local rank and set BEFORE the process group exists, so NCCL's
    communicators bind to it (a device picked from the global rank afterwards is wrong on multi-node runs
    whose nodes differ in GPU count, and too late for the eager NCCL init)."""
    if device_type == "cuda":
        local_rank = local_rank_from_env()
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at "
                "most that many processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun without torchrun
            os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
            os.environ.setdefault("WORLD_SIZE", str(world_size_from_env()))
        dist.init_process_group(backend=process_group_backend(device_type))
    return dist.get_rank()
