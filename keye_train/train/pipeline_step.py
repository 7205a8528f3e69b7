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

import torch
from torch import Tensor, nn

from keye_train.config.schema import TrainConfig
from keye_train.data.batch import PackedBatch
from keye_train.distributed.collectives import sum_scalars
from keye_train.distributed.packed_rows import stack_packed_rows
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import apply_local, parallelize
from keye_train.distributed.pipeline import build_pipeline
from keye_train.distributed.precision import autocast_method
from keye_train.distributed.vision import (
    RoutedVisuals,
    VisualRouter,
    reduce_visual_grads,
    route_replica_visuals,
)
from keye_train.train.optim import clip_grad_norm
from keye_train.train.step import StepResult, batch_tensors, calibrated_visual_cost, strip_pixels


class PipelineTrainStep:
    """The step protocol (`train/step.py`) under pipeline parallelism."""

    def __init__(
        self, model: nn.Module, *, dims: ParallelDims, cfg: TrainConfig, device: torch.device
    ) -> None:
        data = cfg.data
        pipe = cfg.parallel.pipeline
        if data.microbatches % pipe.microbatches:
            raise ValueError(
                f"data.microbatches={data.microbatches} packed rows per DP replica must be a multiple of "
                f"parallel.pipeline.microbatches={pipe.microbatches}"
            )
        if data.eval_interval and data.eval_manifest and data.eval_batches % data.microbatches:
            # The schedule's stages keep the training step's microbatch shape: evaluate in whole steps.
            raise ValueError(
                f"data.eval_batches={data.eval_batches} must be a multiple of data.microbatches="
                f"{data.microbatches} under parallel.pp > 1 (evaluation runs the pipeline in training-step "
                "groups of rows)"
            )
        self.rows_per_step = data.microbatches
        self.dims = dims
        self.device = device
        self.visual_modules = [model.visual, model.mlp_AR]
        self.visual_token_ids = model.visual_token_ids

        # The replicated ViT (outside the stages) gets the run's activation checkpointing and compile;
        # each stage gets TP, CP, AC, compile and FSDP (ZeRO over dp_shard x cp) like a whole model.
        # Precision without FSDP: autocast around the router's encoder calls (wrapped before the router
        # captures encode_visual).
        apply_local(model, cfg=cfg.parallel, precision=cfg.precision, towers=("vision",))
        autocast_method(model, "encode_visual", precision=cfg.precision, device_type=device.type)
        self.router = VisualRouter(model, cost_fn=calibrated_visual_cost(cfg.data.cost_model))

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
        # Checkpoint names stay the full model's (stages keep global layer keys): resumable in any layout.
        self.checkpointed_model = self.checkpoint_view()
        groups = {"vit": model.visual, "projector": model.mlp_AR, "llm": nn.ModuleList(self.stages)}
        self.trained_groups = {k: v for k, v in groups.items() if k in cfg.stage.train}

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

    @property
    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trained_groups.values() for p in m.parameters() if p.requires_grad]

    def clip_grad_norm(self, max_norm: float | None) -> Tensor:
        """Stage norms add up over pp; the replicated ViT and projector count once."""
        shared = [p for m in self.visual_modules for p in m.parameters() if p.requires_grad]
        shared_ids = {id(p) for p in shared}
        params = [p for p in self.trained_parameters if id(p) not in shared_ids]
        return clip_grad_norm(params, max_norm, pp_group=self.dims.submesh("pp"), pp_replicated_params=shared)

    def local_flops(self, rows: list[PackedBatch], keye_cfg: object) -> float | None:
        """This replica's rows' FLOPs (the trainer sums them over dp: once per replica)."""
        from keye_train.distributed.accounting import packed_batch_flops

        return sum(
            packed_batch_flops(keye_cfg, cu_seqlens=b.cu_seqlens.tolist(), grid_thw=b.grid_thw.tolist())
            for b in rows
        )

    def forward_backward(self, rows: list[PackedBatch], *, global_count: Tensor) -> StepResult:
        loss, routed = self._run(rows, global_count=global_count, backward=True)
        return StepResult(
            loss=loss,
            rank_load=float(sum(b.num_target_tokens for b in rows)),
            vit_patches=routed.encoded_patches,
            vit_patches_global=routed.global_patches,
            vit_imbalance=routed.report.imbalance,
        )

    def evaluate(self, rows: list[PackedBatch], *, global_count: Tensor) -> float:
        """The schedule's stages keep the training step's microbatch shape: evaluate in whole-step groups."""
        per_step = self.rows_per_step
        with torch.no_grad():
            return sum(
                self._run(rows[i : i + per_step], global_count=global_count, backward=False)[0]
                for i in range(0, len(rows), per_step)
            )

    def _run(
        self, rows: list[PackedBatch], *, global_count: Tensor, backward: bool
    ) -> tuple[float, RoutedVisuals]:
        """rows: this DP replica's packed rows, with pixels at least on the stage-0 ranks (the others may
        hold empty pixel_values); returns the step's loss, already normalised by the global target count
        (the same value on every rank). backward=False evaluates (call it under torch.no_grad())."""
        if not self.pipeline.has_first_stage:  # pixels are read on stage 0 only: do not copy them here
            rows = strip_pixels(rows)
        batch = stack_packed_rows([batch_tensors(b, self.device) for b in rows])
        routed = route_replica_visuals(
            self.router,
            self.dims,
            grid_thw=batch["grid_thw"],
            pixel_values=batch["pixel_values"] if self.pipeline.has_first_stage else None,
        )
        visual = routed.embeds
        if self.dims.cp > 1:
            batch, visual = self._context_slice(batch, visual)
        loss = self.pipeline.step(
            batch, visual_embeds=visual, num_target_tokens=global_count, backward=backward
        )
        if backward:
            self._reduce_gradients()
        return self._global_loss(loss), routed

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
        value = float(loss) if loss is not None and self.dims.rank_coordinates["tp"] == 0 else 0.0
        return sum_scalars(self.dims, [value], over="world")[0]
