"""The `parallel:` section and `parallelize`: TP (+ context parallelism), precision, activation
checkpointing, compile and FSDP, in that order, on a whole model or a pipeline stage, at any world size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from keye_train.distributed.activation_checkpoint import (
    TOWERS,
    ActivationCheckpointConfig,
    apply_activation_checkpointing,
    apply_compile,
)
from keye_train.distributed.context_parallel import ContextParallelConfig
from keye_train.distributed.fsdp import FSDPConfig, apply_fsdp
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.pipeline_config import PipelineConfig
from keye_train.distributed.precision import autocast_method, check_precision, module_device_type
from keye_train.distributed.tensor_parallel import TensorParallelConfig

DEVICES = ("auto", "cpu", "cuda")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class ParallelConfig:
    """`parallel:` of a recipe: the mesh degrees (validated against the world size and the model by
    `ParallelDims.from_config`) and one sub-config per technique. Precision is the root `precision`."""

    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the other degrees leave of the world
    cp: int = 1
    tp: int = 1
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    tensor: TensorParallelConfig = field(default_factory=TensorParallelConfig)  # with tp > 1
    context: ContextParallelConfig = field(default_factory=ContextParallelConfig)  # with cp > 1
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # with pp > 1
    ac: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    compile: bool = False  # torch.compile each ViT / decoder block
    # inductor (generates kernels: the fast path); aot_eager / eager trace the same graphs without code
    # generation, to tell a compiler problem from a model problem (and for quick CPU smoke runs).
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"parallel.device={self.device!r} must be one of {DEVICES}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"parallel.compile={self.compile!r} must be a bool")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"parallel.compile_backend={self.compile_backend!r} must be one of {COMPILE_BACKENDS}"
            )


def apply_local(
    model: nn.Module, *, cfg: ParallelConfig, precision: str, towers: Sequence[str] = TOWERS
) -> nn.Module:
    """What every layout applies without FSDP: activation checkpointing and compile of the blocks of
    `towers`. (Precision without FSDP is autocast around the forward the caller runs: `autocast_method`.)"""
    check_precision(precision)
    apply_activation_checkpointing(model, mode=cfg.ac.mode, every=cfg.ac.every, towers=towers)
    if cfg.compile:
        apply_compile(model, towers=towers, backend=cfg.compile_backend)
    return model


def parallelize(model: nn.Module, *, dims: ParallelDims, cfg: ParallelConfig, precision: str) -> nn.Module:
    """Parallelise a whole model or a pipeline stage module in place; returns it. Correct at world = 1:
    precision, AC and compile apply, FSDP does not.

    Order matters: TP turns LLM weights into DTensors on the tp mesh that FSDP then shards over dp
    (2-D); AC and compile act on the blocks before FSDP's hooks are attached around them, so each
    block's all-gather stays outside the recomputed / compiled region. The ViT and projector are not
    tensor-parallel: they are data-parallel over the whole world (FSDP over all ranks). bf16 comes from
    FSDP's MixedPrecisionPolicy when FSDP wraps the model, else from autocast around its forward.
    """
    check_precision(precision)
    if dims.tp > 1:
        # Imported here: tensor parallelism lives in its own module and is only needed with tp > 1.
        from keye_train.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(
            model,
            tp_mesh=dims.submesh("tp"),
            sequence_parallel=cfg.tensor.sequence_parallel,
            loss_parallel=cfg.tensor.loss_parallel,
        )
    if dims.cp > 1:
        from keye_train.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, cp_mesh=dims.submesh("cp"), cp_impl=cfg.context.cp_impl)
    apply_local(model, cfg=cfg, precision=precision)
    if dims.world_size > 1:
        visual_replicas = cfg.fsdp.visual_replicas
        apply_fsdp(
            model,
            dims=dims,
            zero_stage=cfg.fsdp.zero_stage,
            precision=precision,
            cpu_offload=cfg.fsdp.cpu_offload,
            visual_replicas=dims.tp if visual_replicas is None else visual_replicas,
        )
    else:
        device_type = module_device_type(model)
        autocast_method(model, "forward", precision=precision, device_type=device_type)
        if hasattr(model, "encode_visual"):
            # The ViT router calls encode_visual from a forward pre-hook, i.e. outside `forward`'s
            # autocast: wrap it too (before a router captures the bound method).
            autocast_method(model, "encode_visual", precision=precision, device_type=device_type)
    return model
