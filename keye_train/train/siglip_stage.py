"""Stage 0: ViT and SigLIP text tower trained with the sigmoid contrastive loss on image-caption pairs."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from keye_train.checkpoint.dcp import combine_modules
from keye_train.data.loader.pairs import PairBatch, PairStream
from keye_train.data.shards.manifest import load_manifest
from keye_train.distributed.contrastive import sigmoid_loss_global_negatives
from keye_train.distributed.parallelize import apply_local
from keye_train.distributed.precision import autocast
from keye_train.models.siglip_text import sigmoid_contrastive_loss
from keye_train.train.build import build_weights
from keye_train.train.stages import apply_stage
from keye_train.train.trainer import Trainer


class SiglipTrainer(Trainer):
    """Data parallel over every rank (the ViT is data-parallel only); towers replicated, gradients summed
    in one flat all-reduce per step. The sigmoid loss is the global batch's: every rank's pairs are
    negatives for all others (`distributed/contrastive.py`), and each rank back-propagates its share."""

    def build_model(self) -> dict[str, torch.nn.Module]:
        self.model, self.tower = build_weights(self.cfg, self.keye_cfg, device=self.device)
        trained = apply_stage(self.model, self.tower, self.cfg.stage)
        # No FSDP here (towers replicated): the ViT's AC and compile like every layout; precision is
        # autocast around the pair loss (train_step).
        apply_local(self.model, cfg=self.cfg.parallel, precision=self.cfg.precision, towers=("vision",))
        # One checkpointed model: the Keye weights (frozen LLM included, for the next stage) and the tower
        # under its Hugging Face names, which export writes to siglip_text/.
        self.checkpointed_model = combine_modules(self.model, self.tower)
        return trained

    def build_stream(self) -> PairStream:
        return PairStream(
            load_manifest(self.cfg.data.manifest),
            tokenizer=self.tokenizer,
            image_cfg=self.cfg.data.image,
            max_patches=self.cfg.stage.max_seq_len,
            text_len=self.keye_cfg.text_tower.max_positions,
        )

    def train_step(self) -> None:
        started = time.perf_counter()
        world = self.dims.world_size
        batches = [self.stream.next_batch() for _ in range(world)]
        mine = batches[self.rank]
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.cfg.precision, self.device.type):
            loss = self._pair_loss(mine)  # this rank's share of the global batch's loss
        loss.backward()
        if world > 1:
            from keye_train.distributed.vision import reduce_visual_grads

            reduce_visual_grads([self.model.visual, self.tower])
        global_loss = torch.tensor(loss.item())
        if world > 1:
            dist.all_reduce(global_loss)
        self._finish_step(
            loss=global_loss.item(),
            tokens=sum(b.pixel_values.shape[0] for b in batches),  # ViT patches
            keys=[key for b in batches for key in b.keys],
            started=started,
            rank_load=float(mine.pixel_values.shape[0]),
        )

    def _pair_loss(self, batch: PairBatch) -> torch.Tensor:
        vision = self.model.visual.vision_model
        grid = batch.grid_thw.to(self.device)
        features = vision(batch.pixel_values.to(self.device), grid)
        image_embeds = vision.pool(features, grid)
        text_embeds = self.tower(batch.text_ids.to(self.device))
        loss_fn = sigmoid_loss_global_negatives if self.dims.world_size > 1 else sigmoid_contrastive_loss
        return loss_fn(
            image_embeds, text_embeds, logit_scale=self.tower.logit_scale, logit_bias=self.tower.logit_bias
        )

    def maybe_evaluate(self) -> None:
        """Held-out evaluation is defined for the language-model stages only."""
