"""Stage 0: ViT and SigLIP text tower trained with the sigmoid contrastive loss on image-caption pairs."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from keye_train.checkpoint.dcp import combine_modules
from keye_train.data.loader.pairs import PairBatch, PairLoader
from keye_train.distributed.contrastive import sigmoid_loss_global_negatives
from keye_train.models.siglip_text import sigmoid_contrastive_loss
from keye_train.train.build import build_pair_loader, build_weights
from keye_train.train.stages import apply_stage
from keye_train.train.trainer import Trainer


class SiglipTrainer(Trainer):
    """Data parallel over every rank (the ViT is data-parallel only); towers replicated, gradients summed
    in one flat all-reduce per step. The sigmoid loss is the global batch's: every rank's pairs are
    negatives for all others (`distributed/contrastive.py`), and each rank back-propagates its share."""

    def build_model(self) -> dict[str, torch.nn.Module]:
        self.model, self.tower = build_weights(self.cfg, self.keye_cfg, device=self.device)
        trained = apply_stage(self.model, self.tower, self.cfg.stage)
        # One checkpointed model: the Keye weights (frozen LLM included, for the next stage) and the tower
        # under its Hugging Face names, which export writes to siglip_text/.
        self.checkpointed_model = combine_modules(self.model, self.tower)
        return trained

    def build_stream(self) -> PairLoader:
        """The planned loader's pairs: each step balanced over every rank (the ViT is data parallel)."""
        return build_pair_loader(
            self.cfg,
            self.tokenizer,
            world_size=self.dims.world_size,
            rank=self.rank,
            text_len=self.keye_cfg.text_tower.max_positions,
        )

    def train_step(self) -> None:
        started = time.perf_counter()
        world = self.dims.world_size
        step = self.stream.next_step()  # this rank's pairs of the planned global step
        mine = step.microbatches[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._pair_loss(mine)  # this rank's share of the global batch's loss
        loss.backward()
        if world > 1:
            from keye_train.distributed.vision import reduce_visual_grads

            reduce_visual_grads([self.model.visual, self.tower])
        patches = float(mine.pixel_values.shape[0])
        global_loss = torch.tensor([loss.item(), patches], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(global_loss)
        self._finish_step(
            loss=global_loss[0].item(),
            tokens=int(global_loss[1].item()),  # ViT patches of the global batch
            keys=step.global_keys,
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
