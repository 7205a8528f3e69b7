"""Stage 0: ViT and SigLIP text tower trained with the sigmoid contrastive loss on image-caption pairs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from keye_train.checkpoint.dcp import combine_modules
from keye_train.config.schema import TrainConfig
from keye_train.data.loader.pairs import PairBatch, PairLoader
from keye_train.distributed.collectives import gather_objects, rank_in, sum_scalars
from keye_train.distributed.contrastive import sigmoid_loss_global_negatives
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import apply_local
from keye_train.distributed.precision import autocast_method, fsdp_policy
from keye_train.distributed.vision import VisualEncoder, VisualRouter
from keye_train.distributed.vision_plan import VisualWorkReport, frame_pixels, visual_items
from keye_train.models.siglip_text import sigmoid_contrastive_loss
from keye_train.train.build import build_pair_loader
from keye_train.train.optim import clip_grad_norm
from keye_train.train.stages import module_groups
from keye_train.train.step import StepResult, calibrated_visual_cost
from keye_train.train.trainer import StepInput, Trainer


def _refuse_layout(cfg: TrainConfig, dims: ParallelDims) -> None:
    """Stage 0 is data-parallel over every rank with replicated towers: refuse what it cannot honour."""
    for name in ("pp", "cp", "tp"):
        value = getattr(dims, name)
        if value > 1:
            raise ValueError(
                f"parallel.{name}={value}: stage 0 (stage.loss=siglip) is data-parallel only (the ViT and "
                f"text tower are replicated on every rank); set parallel.{name}=1"
            )
    if cfg.data.eval_manifest and cfg.data.eval_interval:
        raise ValueError(
            "data.eval_manifest is set but held-out evaluation is defined for the language-model stages "
            "only; set data.eval_interval=0 for stage 0 (stage.loss=siglip)"
        )


class _Towers(nn.Module):
    """Stage 0's root module: the ViT and the text tower, and a forward that runs the step's pair loss, so
    under FSDP every unit is gathered inside the root's forward (FSDP2's first forward defines the root)."""

    def __init__(self, visual: nn.Module, tower: nn.Module, loss_fn) -> None:
        super().__init__()
        self.visual, self.tower = visual, tower
        self.loss_fn = loss_fn  # a bound method of the step (not a module): called, never registered

    def forward(self, batch: PairBatch):
        return self.loss_fn(batch)


def shard_towers(root: _Towers, *, dims: ParallelDims, cfg: TrainConfig) -> None:
    """ZeRO over every rank for stage 0 (parallel.fsdp.zero_stage / cpu_offload and the root precision
    honoured): one FSDP unit per ViT and text layer, the rest of each tower, and the root. The towers'
    remainders (patch/text embeddings, post-norms, pooling heads, logit scale and bias) stay gathered from
    forward to backward: the pooling head and the logit scale are used after their tower's forward
    returns. With one pair batch per step ZeRO-1 and ZeRO-2 coincide; ZeRO-3 also reshards every layer
    after its forward. Gradients are summed (the loss is already each rank's share of the global loss).
    bf16: the MixedPrecisionPolicy (bf16 compute, fp32 sharded masters and fp32 reduce-scatter)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    fsdp = cfg.parallel.fsdp
    offload = CPUOffloadPolicy(pin_memory=dims.device_type == "cuda") if fsdp.cpu_offload else OffloadPolicy()
    common = dict(mesh=dims.submesh("world"), mp_policy=fsdp_policy(cfg.precision), offload_policy=offload)
    layers = [*root.visual.vision_model.encoder.layers, *root.tower.text_model.encoder.layers]
    units = []
    for layer in layers:
        units.append(fully_shard(layer, reshard_after_forward=fsdp.zero_stage == 3, **common))
    for remainder in (root.visual, root.tower):
        units.append(fully_shard(remainder, reshard_after_forward=False, **common))
    units.append(fully_shard(root, reshard_after_forward=False, **common))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


class SiglipStep:
    """The step protocol (`train/step.py`) for the sigmoid contrastive loss.

    Images go through the heterogeneous ViT router like every other stage's: each image of the global
    batch is encoded once in the world by predicted cost, and its pooled embedding is routed to the rank
    holding its caption. The sigmoid loss is the global batch's: every rank's pairs are negatives for all
    others (`distributed/contrastive.py`), and each rank back-propagates its share. With world > 1 the
    towers are sharded with the run's ZeRO stage over every rank (`shard_towers`).
    """

    def __init__(
        self,
        model: nn.Module,
        tower: nn.Module,
        *,
        cfg: TrainConfig,
        dims: ParallelDims,
        device: torch.device,
    ) -> None:
        _refuse_layout(cfg, dims)
        self.model, self.tower, self.dims, self.device = model, tower, dims, device
        self.root = _Towers(model.visual, tower, self._pair_loss)
        # The ViT's AC and compile like every layout (before FSDP's hooks wrap its layers).
        apply_local(model, cfg=cfg.parallel, precision=cfg.precision, towers=("vision",))
        if dims.world_size > 1:
            shard_towers(self.root, dims=dims, cfg=cfg)
        else:
            # No FSDP: bf16 is autocast around the root's forward (router encode, text tower and loss).
            autocast_method(self.root, "forward", precision=cfg.precision, device_type=device.type)
        vision = model.visual.vision_model
        encoder = VisualEncoder(
            # Through `visual` (not vision_model) so that its FSDP unit gathers the embeddings and head.
            fn=lambda pixels, grid: vision.pool(model.visual(pixels, grid), grid),
            rows=lambda item: 1,
            width=model.cfg.vision.hidden_size,
        )
        cost_fn = calibrated_visual_cost(cfg.data.cost_model)
        self.router = VisualRouter(model, cost_fn=cost_fn, encoder=encoder)
        # One checkpointed model: the Keye weights (frozen LLM included, for the next stage) and the tower
        # under its Hugging Face names, which export writes to siglip_text/.
        self.checkpointed_model = combine_modules(model, tower)
        groups = module_groups(model, tower)
        self.trained_groups = {k: v for k, v in groups.items() if k in cfg.stage.train}

    @property
    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trained_groups.values() for p in m.parameters() if p.requires_grad]

    def clip_grad_norm(self, max_norm: float | None) -> Tensor:
        return clip_grad_norm(self.trained_parameters, max_norm)  # sharded norms complete over the mesh

    def local_flops(self, rows: list[PairBatch], keye_cfg: object) -> float | None:
        return None  # MFU is defined for the language-model stages

    def forward_backward(self, rows: list[PairBatch], *, global_count: Tensor) -> StepResult:
        (batch,) = rows
        loss, report, total = self.root(batch)
        loss.backward()
        return StepResult(
            loss=sum_scalars(self.dims, [loss.item()], over="world")[0],
            rank_load=float(batch.pixel_values.shape[0]),
            vit_patches=self.router.encoded_patches,
            vit_patches_global=total,
            vit_imbalance=report.imbalance,
        )

    def evaluate(self, rows: list[PairBatch], *, global_count: Tensor) -> float:
        raise NotImplementedError("held-out evaluation is defined for the language-model stages only")

    def _pair_loss(self, batch: PairBatch) -> tuple[Tensor, VisualWorkReport, int]:
        """This rank's share of the global batch's sigmoid loss, the router's plan and the global patches."""
        grid = batch.grid_thw
        grids = gather_objects(self.dims, grid.tolist(), over="world")
        me = rank_in(self.dims, over="world")
        items, first = [], 0
        for rank, g in enumerate(grids):
            if rank == me:
                first = len(items)
            grid_t = torch.tensor(g, dtype=torch.long).reshape(-1, 3)
            items += visual_items(grid_t, consumers=[rank], grad_copies=1)
        frames = frame_pixels(batch.pixel_values, grid)
        image_embeds, report = self.router(items, pixels=lambda i: frames[i - first])
        text_embeds = self.tower(batch.text_ids.to(self.device))
        loss_fn = sigmoid_loss_global_negatives if self.dims.world_size > 1 else sigmoid_contrastive_loss
        loss = loss_fn(
            image_embeds, text_embeds, logit_scale=self.tower.logit_scale, logit_bias=self.tower.logit_bias
        )
        return loss, report, sum(item.num_patches for item in items)


class SiglipTrainer(Trainer):
    """The trainer with stage 0's data: image-caption pairs, one pair batch per rank per step."""

    def build_stream(self) -> PairLoader:
        """The planned loader's pairs: each step balanced over every rank (the ViT is data parallel)."""
        return build_pair_loader(
            self.cfg,
            self.tokenizer,
            world_size=self.dims.world_size,
            rank=self.rank,
            text_len=self.keye_cfg.text_tower.max_positions,
        )

    def next_step_input(self) -> StepInput:
        step = self.stream.next_step()  # this rank's pairs of the planned global step
        mine = step.microbatches[0]
        return StepInput(
            keys=step.global_keys,
            mine=[mine],
            global_count=1.0,  # the sigmoid loss normalises itself (by the global number of texts)
            tokens=int(sum_scalars(self.dims, [mine.pixel_values.shape[0]], over="world")[0]),  # ViT patches
        )
