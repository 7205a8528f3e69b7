"""The composite Keye-VL-1.5 model: ViT -> projector -> visual tokens spliced into the Qwen3 decoder."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from keye_train.models.configs import KeyeConfig
from keye_train.models.language import Qwen3Model, RMSNorm
from keye_train.models.lm_head import LMHead
from keye_train.models.projector import Projector
from keye_train.models.rope import mrope_position_ids
from keye_train.models.vision import MultiheadPoolingHead, VisionTower


class KeyeForConditionalGeneration(nn.Module):
    """State-dict keys are exactly the Hugging Face Keye-VL-1.5 keys (KEYE_SPEC: Checkpoint layout)."""

    def __init__(self, cfg: KeyeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.mlp_AR = Projector(cfg.projector)
        self.model = Qwen3Model(cfg.language)
        self.lm_head = LMHead(cfg.language.hidden_size, cfg.language.vocab_size)

    @property
    def visual_token_ids(self) -> tuple[int, int]:
        return (self.cfg.image_token_id, self.cfg.video_token_id)

    def encode_visual(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """ViT + projector: (N patches, 3, p, p) -> (N / 4 LLM tokens, text hidden)."""
        return self.mlp_AR(self.visual(pixel_values, grid_thw), grid_thw)

    def embed(self, input_ids: Tensor, visual_embeds: Tensor | None) -> Tensor:
        """Token embeddings with visual embeddings written at the image/video pad positions, in order."""
        embeds = self.model.embed_tokens(input_ids)
        is_visual = torch.isin(input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device))
        num_slots = int(is_visual.sum())
        num_embeds = 0 if visual_embeds is None else visual_embeds.shape[0]
        if num_slots != num_embeds:
            raise ValueError(
                f"the batch has {num_slots} image/video pad tokens but the ViT produced {num_embeds} visual "
                f"embeddings; placeholders and grid_thw disagree"
            )
        if num_embeds == 0:
            return embeds
        return embeds.masked_scatter(is_visual[..., None], visual_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: Tensor,
        *,
        position_ids: Tensor,
        cu_seqlens: Tensor | None = None,
        pixel_values: Tensor | None = None,
        grid_thw: Tensor | None = None,
        visual_embeds: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, S, vocab); with labels (B, S) the chunked loss (summed cross entropy, target count)
        instead, so the [tokens x vocab] logits never exist (models/lm_head.py). Visual input comes as
        pixels (encoded here) or as precomputed embeddings (the heterogeneous ViT path encodes elsewhere
        and routes them in)."""
        if visual_embeds is None and pixel_values is not None and pixel_values.shape[0] > 0:
            visual_embeds = self.encode_visual(pixel_values, grid_thw)
        hidden = self.model(
            self.embed(input_ids, visual_embeds), position_ids=position_ids, cu_seqlens=cu_seqlens
        )
        return self.lm_head(hidden) if labels is None else self.lm_head(hidden, labels=labels)


def position_ids_for(input_ids: Tensor, *, grids_hw: Sequence[tuple[int, int]], cfg: KeyeConfig) -> Tensor:
    """(3, L) M-RoPE position ids of one sample under this model's token ids and merge size."""
    return mrope_position_ids(
        input_ids,
        grids_hw=grids_hw,
        visual_token_ids=(cfg.image_token_id, cfg.video_token_id),
        merge_size=cfg.projector.merge_size,
    )


@torch.no_grad()
def init_weights(module: nn.Module, *, std: float = 0.02) -> None:
    """Fresh initialisation of every parameter (used after materialising from the meta device)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, RMSNorm):
            nn.init.ones_(sub.weight)
        elif isinstance(sub, nn.MultiheadAttention):
            nn.init.normal_(sub.in_proj_weight, std=std)
            nn.init.zeros_(sub.in_proj_bias)
        elif isinstance(sub, MultiheadPoolingHead):
            nn.init.normal_(sub.probe, std=std)


def build_model(cfg: KeyeConfig, *, device: str | torch.device = "cpu", seed: int | None = 0) -> nn.Module:
    """Build on the meta device (no memory), then materialise on `device` with a seeded init.

    device="meta" returns the unmaterialised model, e.g. to plan sharding of the 8B model.
    """
    with torch.device("meta"):
        model = KeyeForConditionalGeneration(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):  # the caller's CPU generator is left as it was
        if seed is not None:
            torch.manual_seed(seed)
        init_weights(model)
    return model
