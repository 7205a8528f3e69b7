"""Native-resolution SigLIP ViT: interpolated position table, 2D RoPE, packed (NaViT) attention."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keye_train.models.attention import packed_attention
from keye_train.models.configs import VisionConfig
from keye_train.models.rope import apply_rotary, vision_rope_cos_sin


def segment_bounds(grid_thw: Tensor) -> Tensor:
    """cu_seqlens with one segment per image and per video frame (attention never crosses frames)."""
    frame_sizes = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
    return F.pad(frame_sizes.cumsum(0), (1, 0)).to(torch.int32)


class SiglipAttention(nn.Module):
    """Bidirectional multi-head attention with optional RoPE; q/k/v kept separate as in the checkpoint."""

    def __init__(self, *, hidden_size: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.attention_fn = functools.partial(packed_attention, backend=backend)

    def forward(self, x: Tensor, *, cu_seqlens: Tensor | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = (
            p(x).view(batch, seqlen, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = self.attention_fn(q, k, v, cu_seqlens=cu_seqlens, causal=False)
        return self.out_proj(out.reshape(batch, seqlen, -1))


class SiglipMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block shared by the vision and text towers."""

    def __init__(
        self, *, hidden_size: int, num_heads: int, intermediate_size: int, eps: float, backend: str
    ) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = SiglipAttention(hidden_size=hidden_size, num_heads=num_heads, backend=backend)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = SiglipMLP(hidden_size, intermediate_size)

    def forward(self, x: Tensor, *, cu_seqlens: Tensor | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens=cu_seqlens, rope=rope)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        eps: float,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(
                hidden_size=hidden_size,
                num_heads=num_heads,
                intermediate_size=intermediate_size,
                eps=eps,
                backend=backend,
            )
            for _ in range(num_layers)
        )

    def forward(self, x: Tensor, *, cu_seqlens: Tensor | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, cu_seqlens=cu_seqlens, rope=rope)
        return x


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.grid = cfg.position_grid
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(self.grid**2, cfg.hidden_size)
        # Unused by the VLM; kept so released checkpoints load and convert without loss (absent when 0).
        self.packing_position_embedding = (
            nn.Embedding(cfg.num_packing_positions, cfg.hidden_size) if cfg.num_packing_positions else None
        )

    def resized_positions(self, h: int, w: int) -> Tensor:
        """The learned grid x grid table resized to (h, w) bilinearly (align_corners=False), row-major."""
        table = self.position_embedding.weight.view(self.grid, self.grid, -1).permute(2, 0, 1)[None]
        if (h, w) != (self.grid, self.grid):
            table = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        return table[0].flatten(1).transpose(0, 1)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype)).flatten(1)  # (N, D)
        cache: dict[tuple[int, int], Tensor] = {}
        positions = []
        for t, h, w in grid_thw.tolist():
            if (h, w) not in cache:
                cache[(h, w)] = self.resized_positions(h, w)
            positions.append(cache[(h, w)].repeat(t, 1))
        return x + torch.cat(positions)


class MultiheadPoolingHead(nn.Module):
    """SigLIP's attention-pooling head: a learned probe attends over one image's patches."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_bsd: Tensor) -> Tensor:
        probe = self.probe.expand(x_bsd.shape[0], -1, -1)
        pooled = self.attention(probe, x_bsd, x_bsd, need_weights=False)[0]
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            eps=cfg.layer_norm_eps,
            backend=cfg.attn_backend,
        )
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = MultiheadPoolingHead(cfg) if cfg.use_head else None

    def rope(self, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
        """2D RoPE angles of every patch; coordinates restart at 0 in every image and frame."""
        rows, cols = [], []
        for t, h, w in grid_thw.tolist():
            rows.append(torch.arange(h).repeat_interleave(w).repeat(t))
            cols.append(torch.arange(w).repeat(h * t))
        device = grid_thw.device
        return vision_rope_cos_sin(
            row_ids=torch.cat(rows).to(device),
            col_ids=torch.cat(cols).to(device),
            head_dim=self.cfg.head_dim,
            theta=self.cfg.rope_theta,
        )

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """pixel_values: (N, 3, patch, patch) raster-ordered patches; grid_thw: (n_items, 3).

        Returns post-LayerNorm patch features (N, hidden).
        """
        x = self.embeddings(pixel_values, grid_thw)[None]
        rope = self.rope(grid_thw) if self.cfg.use_rope else None
        x = self.encoder(x, cu_seqlens=segment_bounds(grid_thw), rope=rope)
        return self.post_layernorm(x[0])

    def pool(self, features: Tensor, grid_thw: Tensor) -> Tensor:
        """One pooled embedding per image/frame (stage-0 contrastive loss)."""
        if self.head is None:
            raise RuntimeError(
                "vision.use_head is false: the pooling head needed by the SigLIP loss is absent"
            )
        bounds = segment_bounds(grid_thw).tolist()
        return torch.cat(
            [self.head(features[start:end][None]) for start, end in zip(bounds[:-1], bounds[1:])]
        )


class VisionTower(nn.Module):
    """`visual` in the checkpoint: a wrapper whose only child is `vision_model` (HF key layout)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        return self.vision_model(pixel_values, grid_thw)
