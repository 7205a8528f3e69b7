"""One optimizer step's forward/backward under pipeline parallelism, with the heterogeneous ViT.

Every rank holds the ViT and projector and encodes a cost-balanced share of the WHOLE global batch's
images and frames; the router sends the embeddings to the pipeline-stage-0 ranks of the DP replica that
needs them (and their gradients back). The decoder runs as pipeline stages (TP inside a stage when
tp > 1). Gradients: stages are summed over DP replicas, the ViT and projector over the world.
With context parallelism each CP rank runs the pipeline on its S/cp slice of the rows (Ulysses attention
inside every stage). Each stage module is parallelised like a whole model (`parallelize`: TP, CP,
activation checkpointing, compile, then FSDP over dp_shard x cp with the run's ZeRO stage);
torch.distributed.pipelining defers the FSDP gradient reduction to the last microbatch of the step.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from keye_train.config.schema import TrainConfig
from keye_train.data.batch import PackedBatch
from keye_train.data.plan.cost import CostModel
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import apply_local, parallelize
from keye_train.distributed.pipeline import build_pipeline, stack_packed_rows
from keye_train.distributed.precision import autocast_method
from keye_train.distributed.vision import (
    CostFn,
    VisualRouter,
    frame_pixels,
    reduce_visual_grads,
    stage0_consumers,
    visual_items,
)
from keye_train.train.step import batch_tensors


def calibrated_visual_cost(path: str | None) -> CostFn | None:
    """The router's per-item cost from `keye-data calibrate`'s coefficients (the planner's cost model);
    None keeps the router's FLOP estimate for the model being trained."""
    if not path:
        return None
    cost_model = CostModel.load(path)
    return lambda item: cost_model.vit_cost([item.num_patches])


class PipelineTrainStep:
    def __init__(
        self, model: nn.Module, *, dims: ParallelDims, cfg: TrainConfig, device: torch.device
    ) -> None:
        pipe = cfg.parallel.pipeline
        if cfg.data.microbatches % pipe.microbatches:
            raise ValueError(
                f"data.microbatches={cfg.data.microbatches} packed rows per DP replica must be a multiple of "
                f"parallel.pipeline.microbatches={pipe.microbatches}"
            )
        self.dims = dims
        self.device = device
        self.visual_modules = [model.visual, model.mlp_AR]
        self.router = VisualRouter(model, cost_fn=calibrated_visual_cost(cfg.data.cost_model))
        self.visual_token_ids = model.visual_token_ids

        # The replicated ViT (outside the stages) gets the run's activation checkpointing and compile;
        # each stage gets TP, CP, AC, compile and FSDP (ZeRO over dp_shard x cp) like a whole model.
        # Precision without FSDP: autocast around the router's encoder calls.
        apply_local(model, cfg=cfg.parallel, precision=cfg.precision, towers=("vision",))
        autocast_method(model, "encode_visual", precision=cfg.precision, device_type=device.type)

        def parallelize_stage(stage: nn.Module) -> nn.Module:
            return parallelize(stage, dims=dims, cfg=cfg.parallel, precision=cfg.precision)

        self.pipeline = build_pipeline(
            model,
            dims=dims,
            schedule=pipe.schedule,
            microbatches=pipe.microbatches,
            virtual_stages=pipe.virtual_stages,
            parallelize_stage=parallelize_stage,
        )
        self.visual_report = None

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.pipeline.stages)

    def checkpoint_view(self) -> nn.Module:
        """One module presenting this rank's stages, ViT and projector under the full model's names
        (`model.layers.7...`, `visual...`), sharing their parameters: one optimizer, layout-free keys."""
        view = nn.Module()
        view.model = nn.Module()
        view.model.layers = nn.ModuleDict()
        for stage in self.stages:
            view.model.layers.update(stage.model.layers)
            for name in ("embed_tokens", "norm"):
                if getattr(stage.model, name) is not None:
                    setattr(view.model, name, getattr(stage.model, name))
            if stage.lm_head is not None:
                view.lm_head = stage.lm_head
        view.visual, view.mlp_AR = self.visual_modules
        return view

    def __call__(self, rows: list[PackedBatch], *, global_count: Tensor, backward: bool = True) -> float:
        """rows: this DP replica's packed rows, with pixels at least on the stage-0 ranks (the others may
        hold empty pixel_values); returns the step's loss, already normalised by the global target count
        (the same value on every rank). backward=False evaluates (call it under torch.no_grad())."""
        if not self.pipeline.has_first_stage:  # pixels are read on stage 0 only: do not copy them here
            rows = [replace(b, pixel_values=b.pixel_values[:0]) for b in rows]
        batch = stack_packed_rows([batch_tensors(b, self.device) for b in rows])
        grids = self._replica_grids(batch["grid_thw"])
        consumers = stage0_consumers(self.dims)
        items, first_item = [], 0
        for replica, grid in enumerate(grids):
            if replica == self.dims.dp_rank:
                first_item = len(items)
            items += visual_items(grid, consumers=consumers[replica], grad_copies=self.dims.tp)
        frames = (
            frame_pixels(batch["pixel_values"], batch["grid_thw"]) if self.pipeline.has_first_stage else []
        )
        visual, self.visual_report = self.router(items, pixels=lambda i: frames[i - first_item])
        if self.dims.cp > 1:
            batch, visual = self._context_slice(batch, visual)
        loss = self.pipeline.step(
            batch, visual_embeds=visual, num_target_tokens=global_count, backward=backward
        )
        if backward:
            self._reduce_gradients()
        return self._global_loss(loss)

    def _replica_grids(self, grid_thw: Tensor) -> list[Tensor]:
        """Every DP replica's grid_thw, in dp order: the router plans the whole global batch's visual
        items on every rank, while each rank holds only its own replica's rows."""
        if self.dims.dp == 1:
            return [grid_thw]
        gathered: list = [None] * self.dims.world_size
        dist.all_gather_object(gathered, (self.dims.dp_rank, grid_thw.tolist()))
        by_replica = dict(gathered)
        return [torch.tensor(by_replica[d], dtype=torch.long).reshape(-1, 3) for d in range(self.dims.dp)]

    def _context_slice(self, batch: dict[str, Tensor], visual: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """This CP rank's slice of the replica's rows; on stage 0 also the visual rows it splices (the
        router delivered the replica's whole visual sequence to every CP peer of stage 0)."""
        from keye_train.distributed.context_parallel import local_visual_embeds, split_for_context_parallel

        local = split_for_context_parallel(
            batch,
            cp_rank=self.dims.rank_coordinates["cp"],
            cp_size=self.dims.cp,
            visual_token_ids=self.visual_token_ids,
        )
        visual_index = local.pop("visual_index")
        if self.pipeline.has_first_stage:
            visual = local_visual_embeds(visual, visual_index)
        return local, visual

    def _reduce_gradients(self) -> None:
        """Stage gradients were reduced by FSDP (sum over dp x cp) on the schedule's last backward."""
        reduce_visual_grads(self.visual_modules)

    def _global_loss(self, loss: Tensor | None) -> float:
        """Last-stage ranks hold their replica's loss (TP peers the same value): sum once per replica."""
        value = torch.zeros(1, dtype=torch.float64)
        if loss is not None and self.dims.rank_coordinates["tp"] == 0:
            value += float(loss)
        dist.all_reduce(value)
        return value.item()
