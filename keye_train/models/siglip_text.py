"""SigLIP text tower and the sigmoid contrastive loss, for stage-0 ViT continued pre-training."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keye_train.models.configs import TextTowerConfig
from keye_train.models.vision import SiglipEncoder


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.shape[1] > self.position_embedding.num_embeddings:
            raise ValueError(
                f"text length {input_ids.shape[1]} exceeds text_tower.max_positions="
                f"{self.position_embedding.num_embeddings}"
            )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class SiglipTextTransformer(nn.Module):
    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = SiglipEncoder(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            eps=cfg.layer_norm_eps,
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L), padded to a fixed length as SigLIP was trained; returns pooled (B, proj)."""
        x = self.encoder(self.embeddings(input_ids), cu_seqlens=None, rope=None)
        # SigLIP pools the LAST position (padding included): that is how the released towers were trained.
        return self.head(self.final_layer_norm(x)[:, -1])


class SiglipTextTower(nn.Module):
    """Keys `text_model.*`, `logit_scale`, `logit_bias` as in a Hugging Face SiglipModel."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = SiglipTextTransformer(cfg)
        # SigLIP's initialisation: temperature 10, bias -10 (the paper's values).
        self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))
        self.logit_bias = nn.Parameter(torch.tensor([-10.0]))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.text_model(input_ids)


def sigmoid_contrastive_loss(
    image_embeds: Tensor, text_embeds: Tensor, *, logit_scale: Tensor, logit_bias: Tensor
) -> Tensor:
    """SigLIP's pairwise sigmoid loss: matching pairs are positives, all other pairs negatives.

    Summed over the text's row of pairs and averaged over texts, as in the SigLIP recipe.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = text_embeds @ image_embeds.t() * logit_scale.exp() + logit_bias
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum(dim=-1).mean()
