"""`parallelize`: TP (+ context parallelism), activation checkpointing, compile and FSDP, in that order."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from keye_train.distributed.activation_checkpoint import (
    ActivationCheckpointConfig,
    apply_activation_checkpointing,
    apply_compile,
)
from keye_train.distributed.fsdp import FSDPConfig, apply_fsdp
from keye_train.distributed.parallel_dims import ParallelDims


@dataclass
class ParallelizeConfig:
    """Everything `parallelize` needs besides the mesh degrees (those live in ParallelDims)."""

    zero_stage: int = 3
    activation_checkpointing: str = "none"  # none | full | selective
    ac_every: int = 2  # selective: checkpoint every k-th block
    compile: bool = False  # torch.compile each ViT / decoder block
    mixed_precision: bool = True  # bf16 compute, fp32 gradient reduction
    cpu_offload: bool = False
    sequence_parallel: bool = True  # with TP: norms and residuals sharded over the sequence
    loss_parallel: bool = True  # with TP: vocab-sharded logits (see tensor_parallel.py)
    # Ranks that back-propagate the same loss terms through the same visual item. None = tp: when every
    # TP peer runs the ViT inside the model's forward they compute identical visual gradients. Pass 1
    # under the heterogeneous ViT router (each item is encoded once in the world).
    visual_replicas: int | None = None

    def __post_init__(self) -> None:
        # Validate through the component configs so the messages name the same keys everywhere.
        FSDPConfig(
            zero_stage=self.zero_stage,
            mixed_precision=self.mixed_precision,
            cpu_offload=self.cpu_offload,
            visual_replicas=self.visual_replicas or 1,
        )
        ActivationCheckpointConfig(mode=self.activation_checkpointing, every=self.ac_every)


def parallelize(
    model: nn.Module, *, dims: ParallelDims, cfg: ParallelizeConfig, cp_impl: str = "ulysses"
) -> nn.Module:
    """Parallelise a whole model or a pipeline stage module in place; returns it.

    Order matters: TP turns LLM weights into DTensors on the tp mesh that FSDP then shards over dp
    (2-D); AC and compile act on the blocks before FSDP's hooks are attached around them, so each
    block's all-gather stays outside the recomputed / compiled region. The ViT and projector are not
    tensor-parallel: they are data-parallel over the whole world (FSDP over all ranks).
    """
    if dims.tp > 1:
        # Imported here: tensor parallelism lives in its own module and is only needed with tp > 1.
        from keye_train.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(
            model,
            tp_mesh=dims.submesh("tp"),
            sequence_parallel=cfg.sequence_parallel,
            loss_parallel=cfg.loss_parallel,
        )
    if dims.cp > 1:
        from keye_train.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, cp_mesh=dims.submesh("cp"), cp_impl=cp_impl)
    apply_activation_checkpointing(model, mode=cfg.activation_checkpointing, every=cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    if dims.world_size > 1:
        apply_fsdp(
            model,
            dims=dims,
            zero_stage=cfg.zero_stage,
            mixed_precision=cfg.mixed_precision,
            cpu_offload=cfg.cpu_offload,
            visual_replicas=dims.tp if cfg.visual_replicas is None else cfg.visual_replicas,
        )
    return model
