"""The step protocol, and its plain form: forward and backward of a step's packed rows under DP/FSDP, TP, CP.

Every step kind (this plain step, `pipeline_step.PipelineTrainStep`, `siglip_stage.SiglipStep`) exposes
the same interface (`TrainStep`), so the trainer never branches on the layout or the stage:

- `forward_backward(rows, global_count=...)`: gradients of the step's globally normalised loss, returning
  the loss (the same on every rank) and this rank's share of the work;
- `evaluate(rows, global_count=...)`: the same forward without gradients;
- `trained_parameters` / `clip_grad_norm(max_norm)`: what the optimizer steps and how its global norm is
  measured and clipped;
- `checkpointed_model`: the module whose state dict is checkpointed (full-model names in every layout);
- `trained_groups`: the optimizer's module groups.

The ViT is always the heterogeneous router's (`distributed/vision.py`): each image or frame of the global
batch is encoded exactly once in the world, by cost, and its embeddings are routed to the ranks whose rows
hold its placeholders. There is no variant that runs the ViT inside the model's forward per TP/CP rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor, nn

from keye_train.config.schema import TrainConfig
from keye_train.data.batch import PackedBatch
from keye_train.data.plan.cost import CostModel
from keye_train.distributed.collectives import sum_scalars
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.vision import RoutedVisuals, VisualRouter, route_replica_visuals
from keye_train.distributed.vision_plan import CostFn
from keye_train.train.optim import clip_grad_norm
from keye_train.train.stages import module_groups


@dataclass
class StepResult:
    loss: float  # the step's loss normalised by the global target count: the same on every rank
    rank_load: float  # this rank's work (target tokens; ViT patches at stage 0), for imbalance metrics
    vit_patches: int = 0  # patches of real images/frames this rank encoded
    vit_patches_global: int = 0  # patches of the whole global batch
    vit_imbalance: float | None = None  # planned max/mean ViT cost over the world


class TrainStep(Protocol):
    checkpointed_model: nn.Module
    trained_groups: dict[str, nn.Module]

    def forward_backward(self, rows: list, *, global_count: Tensor) -> StepResult: ...

    def evaluate(self, rows: list, *, global_count: Tensor) -> float: ...

    @property
    def trained_parameters(self) -> list[nn.Parameter]: ...

    def clip_grad_norm(self, max_norm: float | None) -> Tensor: ...

    def local_flops(self, rows: list, keye_cfg: object) -> float | None: ...


def batch_tensors(batch: PackedBatch, device: torch.device) -> dict[str, Tensor]:
    return {
        "input_ids": batch.input_ids.to(device),
        "labels": batch.labels.to(device),
        "position_ids": batch.position_ids.to(device),
        "cu_seqlens": batch.cu_seqlens.to(device),
        "pixel_values": batch.pixel_values.to(device),
        "grid_thw": batch.grid_thw.to(device),
    }


class VisualWork:
    """Accumulates the router's per-round counts over a step's rounds (microbatches)."""

    def __init__(self) -> None:
        self.encoded = self.total = 0
        self.imbalance: float | None = None

    def add(self, routed: RoutedVisuals) -> None:
        self.encoded += routed.encoded_patches
        self.total += routed.global_patches
        self.imbalance = max(self.imbalance or 0.0, routed.report.imbalance)


@contextlib.contextmanager
def routed_visual_input(model: nn.Module, compute: Callable[[], Tensor | None]) -> Iterator[list[Tensor]]:
    """While active, a call of `model(...)` first runs `compute()` (the router) and passes its result as
    `visual_embeds`; the yielded list then holds it, so the caller can tie it to the loss.

    Why a forward pre-hook rather than calling the router before the model: under FSDP2 the ViT units are
    children of the root module, and the first unit to run forward becomes the root (lazy init). Running
    the router inside the root's forward, after its own pre-forward hook, keeps the real root in charge of
    the step's streams and of the post-backward callback.
    """
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = compute()
        if embeds is not None:
            captured.append(embeds)
        return args, {**kwargs, "visual_embeds": embeds, "pixel_values": None}

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def zero_anchor(tensors: list[Tensor]) -> Tensor | float:
    """Exactly zero, but it ties the routed embeddings into this rank's backward when its rows (or its CP
    slice) splice none of them: every rank must run the router's reverse all-to-all."""
    return sum((t.sum() * 0.0 for t in tensors if t.requires_grad), 0.0)


class LanguageModelStep:
    """Next-token loss of a step's microbatches, backward included, for layouts without pipeline stages.

    The loss is this rank's summed cross entropy divided by the global number of target tokens of the
    whole step, and FSDP sums (never averages) gradients, so any split of tokens over microbatches,
    DP and CP ranks gives the single-process gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dims: ParallelDims,
        loss_parallel: bool,
        device: torch.device,
        router: VisualRouter,
        trained_groups: dict[str, nn.Module],
    ) -> None:
        self.model = model
        self.dims = dims
        self.loss_parallel = loss_parallel
        self.device = device
        self.router = router
        self.trained_groups = trained_groups
        self.checkpointed_model = model

    @property
    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trained_groups.values() for p in m.parameters() if p.requires_grad]

    def clip_grad_norm(self, max_norm: float | None) -> Tensor:
        return clip_grad_norm(self.trained_parameters, max_norm)

    def local_flops(self, rows: list[PackedBatch], keye_cfg: object) -> float | None:
        from keye_train.distributed.accounting import packed_batch_flops

        return sum(
            packed_batch_flops(keye_cfg, cu_seqlens=b.cu_seqlens.tolist(), grid_thw=b.grid_thw.tolist())
            for b in rows
        )

    def forward_backward(self, rows: list[PackedBatch], *, global_count: Tensor) -> StepResult:
        work = VisualWork()
        local = 0.0
        for index, batch in enumerate(rows):
            self._prepare_microbatch(is_last=index == len(rows) - 1)
            local += self.microbatch(batch, global_count=global_count, work=work)
        return StepResult(
            loss=self._global_loss(local) / global_count.item(),
            rank_load=float(sum(b.num_target_tokens for b in rows)),
            vit_patches=work.encoded,
            vit_patches_global=work.total,
            vit_imbalance=work.imbalance,
        )

    def evaluate(self, rows: list[PackedBatch], *, global_count: Tensor) -> float:
        with torch.no_grad():
            local = sum(self.microbatch(b, global_count=global_count, backward=False) for b in rows)
        return self._global_loss(local) / global_count.item()

    def microbatch(
        self,
        batch: PackedBatch,
        *,
        global_count: Tensor,
        backward: bool = True,
        work: VisualWork | None = None,
    ) -> float:
        """One packed microbatch; returns this rank's summed loss (not normalised)."""
        inputs = batch_tensors(batch, self.device)
        visual_index = None
        if self.dims.cp > 1:
            from keye_train.distributed.context_parallel import split_for_context_parallel

            inputs = split_for_context_parallel(
                inputs,
                cp_rank=self.dims.rank_coordinates["cp"],
                cp_size=self.dims.cp,
                visual_token_ids=self.model.visual_token_ids,
            )
            visual_index = inputs.pop("visual_index")

        def visuals() -> Tensor | None:
            routed = route_replica_visuals(
                self.router, self.dims, grid_thw=inputs["grid_thw"], pixel_values=inputs["pixel_values"]
            )
            if work is not None:
                work.add(routed)
            if visual_index is None:
                return routed.embeds
            from keye_train.distributed.context_parallel import local_visual_embeds

            # The replica's whole visual sequence arrived; this CP rank splices its slice's rows.
            sliced = local_visual_embeds(routed.embeds, visual_index)
            return sliced + zero_anchor([routed.embeds]) if sliced.requires_grad else sliced

        with self._loss_context(), routed_visual_input(self.model, visuals) as routed:
            # With labels the model returns the chunked loss (no [tokens x vocab] logits; lm_head.py);
            # the visual embeddings come from the router (the hook), never from a ViT run in here.
            loss_sum, count = self.model(
                inputs["input_ids"],
                position_ids=inputs["position_ids"],
                cu_seqlens=inputs["cu_seqlens"],
                labels=inputs["labels"],
            )
            if backward:
                (loss_sum / global_count + zero_anchor(routed)).backward()
        return float(loss_sum.detach())

    def _global_loss(self, local_sum: float) -> float:
        """Sum of the loss sums of every rank that saw different tokens (TP peers hold the same value)."""
        return sum_scalars(self.dims, [local_sum], over="dp_cp")[0]

    def _prepare_microbatch(self, *, is_last: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model, FSDPModule):
            from keye_train.distributed.fsdp import set_microbatch

            set_microbatch(self.model, is_last=is_last)

    def _loss_context(self):
        if self.dims.tp > 1 and self.loss_parallel:
            from keye_train.distributed.tensor_parallel import loss_parallel_context

            return loss_parallel_context(True)
        return contextlib.nullcontext()


def strip_pixels(rows: list[PackedBatch]) -> list[PackedBatch]:
    """Rows without their pixels (grid_thw kept): for ranks that never read them."""
    return [replace(b, pixel_values=b.pixel_values[:0]) for b in rows]


def calibrated_visual_cost(path: str | None) -> CostFn | None:
    """The router's per-item cost from `keye-data calibrate`'s coefficients (the planner's cost model);
    None keeps the router's FLOP estimate for the model being trained."""
    if not path:
        return None
    cost_model = CostModel.load(path)
    return lambda item: cost_model.vit_cost([item.num_patches])


def build_train_step(
    model: nn.Module,
    *,
    tower: nn.Module | None = None,
    cfg: TrainConfig,
    dims: ParallelDims,
    device: torch.device,
) -> TrainStep:
    """The step this stage and layout need, with its model parallelised (the model is frozen already):
    the SigLIP stage's (loss siglip), the pipeline's (pp > 1) or the plain one."""
    if cfg.stage.loss == "siglip":
        from keye_train.train.siglip_stage import SiglipStep

        return SiglipStep(model, tower, cfg=cfg, dims=dims, device=device)
    if dims.pp > 1:
        from keye_train.train.pipeline_step import PipelineTrainStep

        return PipelineTrainStep(model, dims=dims, cfg=cfg, device=device)
    from keye_train.distributed.parallelize import parallelize

    # Any world size: TP/CP/FSDP where the layout has them, precision, AC and compile always. The router
    # encodes each item once in the world: the ViT's FSDP units sum gradients as they are.
    parallel = replace(cfg.parallel, fsdp=replace(cfg.parallel.fsdp, visual_replicas=1))
    parallelize(model, dims=dims, cfg=parallel, precision=cfg.precision)
    groups = module_groups(model, None)
    return LanguageModelStep(
        model,
        dims=dims,
        loss_parallel=cfg.parallel.tensor.loss_parallel,
        device=device,
        router=VisualRouter(model, cost_fn=calibrated_visual_cost(cfg.data.cost_model)),
        trained_groups={k: v for k, v in groups.items() if k in cfg.stage.train},
    )
