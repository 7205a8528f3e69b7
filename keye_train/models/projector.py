"""Keye-VL-1.5 projector (`mlp_AR`): 2x2 merge of raster-ordered patches, LayerNorm, Linear-GELU-Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keye_train.models.configs import ProjectorConfig


def merge_patches(features: Tensor, grid_thw: Tensor, merge_size: int) -> Tensor:
    """Concatenate each merge_size x merge_size block of raster-ordered patches.

    Within a block the order is top-left, top-right, bottom-left, bottom-right (row-major). Frames keep
    their own grids: a (t, h, w) item yields t * (h/m) * (w/m) merged rows.
    """
    m = merge_size
    merged = []
    offset = 0
    for t, h, w in grid_thw.tolist():
        if h % m or w % m:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by merge_size={m}")
        n = t * h * w
        block = features[offset : offset + n].view(t, h // m, m, w // m, m, -1)
        merged.append(block.permute(0, 1, 3, 2, 4, 5).reshape(t * (h // m) * (w // m), -1))
        offset += n
    if offset != features.shape[0]:
        raise ValueError(f"grid_thw covers {offset} patches but {features.shape[0]} features were given")
    return torch.cat(merged) if merged else features.new_empty(0, features.shape[-1] * m * m)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pre_norm = nn.LayerNorm(cfg.merged_size, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(cfg.merged_size, cfg.merged_size)
        self.linear_2 = nn.Linear(cfg.merged_size, cfg.text_hidden_size)

    def forward(self, features: Tensor, grid_thw: Tensor) -> Tensor:
        """(N patches, vision hidden) -> (N / merge^2 tokens, text hidden)."""
        x = self.pre_norm(merge_patches(features, grid_thw, self.cfg.merge_size))
        return self.linear_2(F.gelu(self.linear_1(x)))
