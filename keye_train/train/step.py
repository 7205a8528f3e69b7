"""Forward and backward of one packed microbatch under the run's layout (DP/FSDP, TP, CP; PP separately)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from keye_train.data.batch import PackedBatch
from keye_train.distributed.parallel_dims import ParallelDims


def batch_tensors(batch: PackedBatch, device: torch.device) -> dict[str, Tensor]:
    return {
        "input_ids": batch.input_ids.to(device),
        "labels": batch.labels.to(device),
        "position_ids": batch.position_ids.to(device),
        "cu_seqlens": batch.cu_seqlens.to(device),
        "pixel_values": batch.pixel_values.to(device),
        "grid_thw": batch.grid_thw.to(device),
    }


@dataclass
class LanguageModelStep:
    """Next-token loss of one microbatch, backward included, for layouts without pipeline stages.

    The loss is this rank's summed cross entropy divided by the global number of target tokens of the
    whole step, and FSDP sums (never averages) gradients, so any split of tokens over microbatches,
    DP and CP ranks gives the single-process gradient.
    """

    model: nn.Module
    dims: ParallelDims
    loss_parallel: bool
    device: torch.device

    def __call__(
        self, batch: PackedBatch, *, global_count: Tensor, backward: bool = True
    ) -> tuple[float, int]:
        inputs = batch_tensors(batch, self.device)
        visual_index = self._ensure_visual_work(inputs)
        if self.dims.cp > 1:
            from keye_train.distributed.context_parallel import split_for_context_parallel

            inputs = split_for_context_parallel(
                inputs,
                cp_rank=self.dims.rank_coordinates["cp"],
                cp_size=self.dims.cp,
                visual_token_ids=self.model.visual_token_ids,
            )
            sliced = inputs.pop("visual_index")
            visual_index = sliced if visual_index is None else visual_index
        route_context = contextlib.nullcontext()
        if visual_index is not None:
            from keye_train.distributed.context_parallel import route_visual_to_slice

            route_context = route_visual_to_slice(self.model, visual_index)
        with self._loss_context(), route_context as route:
            # With labels the model returns the chunked loss (no [tokens x vocab] logits; lm_head.py).
            loss_sum, count = self.model(
                inputs["input_ids"],
                position_ids=inputs["position_ids"],
                cu_seqlens=inputs["cu_seqlens"],
                pixel_values=inputs["pixel_values"],
                grid_thw=inputs["grid_thw"],
                labels=inputs["labels"],
            )
            loss = loss_sum / global_count
            if route is not None:
                loss = loss + route.zero_anchor()
            if backward:
                loss.backward()
        return float(loss_sum.detach()), int(count)

    def _ensure_visual_work(self, inputs: dict[str, Tensor]) -> Tensor | None:
        """Give a text-only row a blank 2x2-patch image when other ranks may run the ViT.

        FSDP's ViT and projector units all-gather and reduce-scatter in every rank's forward and backward;
        a rank whose row has no image or video would skip them and deadlock the others. The blank image is
        encoded inside the root forward like any other, cut away before the splice (the returned empty
        index keeps no row) and tied to the loss with weight zero: same collectives, unchanged math.
        """
        if inputs["pixel_values"].shape[0] > 0 or self.dims.world_size == 1:
            return None
        patch = self.model.visual.vision_model.cfg.patch_size
        inputs["pixel_values"] = torch.zeros(4, 3, patch, patch, device=self.device)
        inputs["grid_thw"] = torch.tensor([[1, 2, 2]], device=self.device)
        return torch.empty(0, dtype=torch.long, device=self.device)

    def _loss_context(self):
        if self.dims.tp > 1 and self.loss_parallel:
            from keye_train.distributed.tensor_parallel import loss_parallel_context

            return loss_parallel_context(True)
        return contextlib.nullcontext()
