"""Keye-VL-1.5 for transformers (`trust_remote_code=True`), written by keye_train.

A SigLIP ViT at native resolution (bilinear-resized learned position table, 2D RoPE, attention inside each
image / video frame), the `mlp_AR` projector (2x2 merge, LayerNorm, Linear, GELU, Linear) and a Qwen3
decoder with chunked 3D M-RoPE. Parameter names are those of the released checkpoint.

Inputs follow the Qwen-VL convention: `pixel_values` (patches, 3, 14, 14) with `image_grid_thw`, and
`pixel_values_videos` with `video_grid_thw` (one row per group of equally sized frames; every frame is
its own grid for attention and positions, as SlowFast frames differ in size).

This file is standalone (torch and transformers only). Generation uses transformers' DynamicCache (passed
as `cache`, or `past_key_values` in transformers 4); decoding positions continue from the prompt's M-RoPE
positions. For serving, use vLLM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # loaded as remote code the files sit side by side in one module package
    from .configuration_keye_vl1_5 import KeyeVL1_5Config, KeyeVL1_5VisionConfig
except ImportError:  # imported as a plain module
    from configuration_keye_vl1_5 import KeyeVL1_5Config, KeyeVL1_5VisionConfig


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., seq, heads, head_dim); cos/sin broadcast to it. Computed in fp32."""
    out = x.float() * cos + _rotate_half(x.float()) * sin
    return out.to(x.dtype)


def _frame_grids(grid_thw: torch.Tensor | None) -> list[tuple[int, int]]:
    """(h, w) of every single image or video frame, in order (a row with t frames gives t grids)."""
    if grid_thw is None:
        return []
    return [(int(h), int(w)) for t, h, w in grid_thw.tolist() for _ in range(int(t))]


# ----------------------------------------------------------------------------------------------- vision


class KeyeVL1_5VisionEmbeddings(nn.Module):
    def __init__(self, config: KeyeVL1_5VisionConfig) -> None:
        super().__init__()
        self.side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.side * self.side, config.hidden_size)
        if config.num_packing_positions:
            # Carried for checkpoint compatibility; the VLM never reads it.
            self.packing_position_embedding = nn.Embedding(config.num_packing_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(1)
        table = self.position_embedding.weight.reshape(self.side, self.side, -1).permute(2, 0, 1)[None]
        resized: dict[tuple[int, int], torch.Tensor] = {}
        parts = []
        for h, w in grids:
            if (h, w) not in resized:
                grid = table
                if (h, w) != (self.side, self.side):
                    grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)
                resized[(h, w)] = grid[0].reshape(grid.shape[1], h * w).t()
            parts.append(resized[(h, w)])
        return patches + torch.cat(parts)


class KeyeVL1_5VisionAttention(nn.Module):
    def __init__(self, config: KeyeVL1_5VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, lengths: list[int], rope: tuple[torch.Tensor, torch.Tensor] | None):
        n = x.shape[0]
        q, k, v = (
            p(x).view(n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        outputs = []
        for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            # One image or frame at a time: attention never crosses their boundaries.
            out = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            outputs.append(out.transpose(0, 1).reshape(qs.shape[0], -1))
        return self.out_proj(torch.cat(outputs))


class KeyeVL1_5VisionMLP(nn.Module):
    def __init__(self, config: KeyeVL1_5VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class KeyeVL1_5VisionLayer(nn.Module):
    def __init__(self, config: KeyeVL1_5VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = KeyeVL1_5VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = KeyeVL1_5VisionMLP(config)

    def forward(self, x, lengths, rope):
        x = x + self.self_attn(self.layer_norm1(x), lengths, rope)
        return x + self.mlp(self.layer_norm2(x))


class KeyeVL1_5VisionEncoder(nn.Module):
    def __init__(self, config: KeyeVL1_5VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(KeyeVL1_5VisionLayer(config) for _ in range(config.num_hidden_layers))


class KeyeVL1_5PoolingHead(nn.Module):
    """SigLIP's attention-pooling head; kept for checkpoint compatibility, unused by generation."""

    def __init__(self, config: KeyeVL1_5VisionConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(
            config.hidden_size, config.num_attention_heads, batch_first=True
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = KeyeVL1_5VisionMLP(config)


class KeyeVL1_5VisionTransformer(nn.Module):
    def __init__(self, config: KeyeVL1_5VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = KeyeVL1_5VisionEmbeddings(config)
        self.encoder = KeyeVL1_5VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.vision_use_head:
            self.head = KeyeVL1_5PoolingHead(config)

    def rotary(self, grids: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE: a quarter of head_dim's frequencies turn with the row, a quarter with the column
        (patch coordinates restart in every frame); the halves repeat for rotate-half."""
        half = self.config.hidden_size // self.config.num_attention_heads // 2
        freqs = 1.0 / self.config.rope_theta ** (
            torch.arange(0, half, 2, dtype=torch.float32, device=device) / half
        )
        rows = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in grids])
        cols = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in grids])
        angles = torch.cat((torch.outer(rows.float(), freqs), torch.outer(cols.float(), freqs)), dim=-1)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos(), angles.sin()

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x = self.embeddings(pixel_values, grids)
        rope = self.rotary(grids, x.device) if self.config.use_rope else None
        lengths = [h * w for h, w in grids]
        for layer in self.encoder.layers:
            x = layer(x, lengths, rope)
        return self.post_layernorm(x)


class KeyeVL1_5VisionModel(nn.Module):
    def __init__(self, config: KeyeVL1_5VisionConfig) -> None:
        super().__init__()
        self.vision_model = KeyeVL1_5VisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.vision_model(pixel_values, grids)


class KeyeVL1_5Projector(nn.Module):
    """2x2 merge of raster-ordered patches (TL, TR, BL, BR), then LayerNorm, Linear, GELU, Linear."""

    def __init__(self, config: KeyeVL1_5Config) -> None:
        super().__init__()
        self.merge = config.vision_config.spatial_merge_size
        merged = config.vision_config.hidden_size * self.merge**2
        self.pre_norm = nn.LayerNorm(merged, eps=1e-5)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, config.hidden_size)

    def forward(self, features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        m, blocks, start = self.merge, [], 0
        for h, w in grids:
            frame = features[start : start + h * w].reshape(h // m, m, w // m, m, -1)
            blocks.append(frame.permute(0, 2, 1, 3, 4).reshape((h // m) * (w // m), -1))
            start += h * w
        x = self.pre_norm(torch.cat(blocks))
        return self.linear_2(F.gelu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------- text


class KeyeVL1_5RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KeyeVL1_5TextAttention(nn.Module):
    def __init__(self, config: KeyeVL1_5Config) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = KeyeVL1_5RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = KeyeVL1_5RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, rope, mask, cache=None, layer_idx: int = 0):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class KeyeVL1_5TextMLP(nn.Module):
    def __init__(self, config: KeyeVL1_5Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KeyeVL1_5DecoderLayer(nn.Module):
    def __init__(self, config: KeyeVL1_5Config) -> None:
        super().__init__()
        self.input_layernorm = KeyeVL1_5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = KeyeVL1_5TextAttention(config)
        self.post_attention_layernorm = KeyeVL1_5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = KeyeVL1_5TextMLP(config)

    def forward(self, x, rope, mask, cache=None, layer_idx: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class KeyeVL1_5TextModel(nn.Module):
    def __init__(self, config: KeyeVL1_5Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(KeyeVL1_5DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = KeyeVL1_5RMSNorm(config.hidden_size, config.rms_norm_eps)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked M-RoPE: position_ids (3, B, S) for T, H, W; frequency chunk c follows component c."""
        dim = self.config.head_dim
        freqs = 1.0 / self.config.rope_theta ** (
            torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim
        )
        angles = position_ids.float()[..., None] * freqs  # (3, B, S, dim/2)
        chunks = angles.split(list(self.config.mrope_section), dim=-1)
        angles = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
        return angles.cos(), angles.sin()

    def forward(self, inputs_embeds, position_ids, mask, cache=None):
        rope = self.rotary(position_ids)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------- model


class KeyeVL1_5PreTrainedModel(PreTrainedModel):
    config_class = KeyeVL1_5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["KeyeVL1_5DecoderLayer", "KeyeVL1_5VisionLayer"]
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, KeyeVL1_5RMSNorm):
            nn.init.ones_(module.weight)


class KeyeVL1_5ForConditionalGeneration(KeyeVL1_5PreTrainedModel, GenerationMixin):
    """State-dict keys: visual.vision_model.*, mlp_AR.*, model.*, lm_head.* (the released layout)."""

    def __init__(self, config: KeyeVL1_5Config) -> None:
        super().__init__(config)
        self.visual = KeyeVL1_5VisionModel(config.vision_config)
        self.mlp_AR = KeyeVL1_5Projector(config)
        self.model = KeyeVL1_5TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.next_position: torch.Tensor | None = None  # (B,) M-RoPE position of the next decoded token
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def encode_visual(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.mlp_AR(self.visual(pixel_values, grids), grids)

    def get_rope_index(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(3, B, S) M-RoPE positions. Text advances T, H and W together; a visual block (one image or one
        video frame, merged grid h' x w') at position s gets (s, s + row, s + col) and the next token
        starts at s + max(h', w'). Padding (attention_mask 0) gets position 0."""
        cfg = self.config
        merge = cfg.vision_config.spatial_merge_size
        images, frames = _frame_grids(image_grid_thw), _frame_grids(video_grid_thw)
        next_image = next_frame = 0
        positions = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
        for b, row in enumerate(input_ids.tolist()):
            keep = range(len(row)) if attention_mask is None else attention_mask[b].nonzero()[:, 0].tolist()
            keep = list(keep)
            s, i = 0, 0
            while i < len(keep):
                token = row[keep[i]]
                if token not in (cfg.image_token_id, cfg.video_token_id):
                    positions[:, b, keep[i]] = s
                    s, i = s + 1, i + 1
                    continue
                if token == cfg.image_token_id:
                    h, w = images[next_image]
                    next_image += 1
                else:
                    h, w = frames[next_frame]
                    next_frame += 1
                hm, wm = h // merge, w // merge
                where = torch.tensor(keep[i : i + hm * wm], device=input_ids.device)
                grid_rows = torch.arange(hm, device=input_ids.device).repeat_interleave(wm)
                grid_cols = torch.arange(wm, device=input_ids.device).repeat(hm)
                positions[0, b, where] = s
                positions[1, b, where] = s + grid_rows
                positions[2, b, where] = s + grid_cols
                s, i = s + max(hm, wm), i + hm * wm
        return positions

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cfg = self.config
        cache = kwargs.pop("cache", None)  # transformers 5 name
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # transformers 4 name
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache

            try:
                cache = DynamicCache(config=cfg)
            except TypeError:  # transformers 4
                cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
            for values, grid_thw, token_id in (
                (pixel_values, image_grid_thw, cfg.image_token_id),
                (pixel_values_videos, video_grid_thw, cfg.video_token_id),
            ):
                if values is None or values.shape[0] == 0 or past:  # visuals live in the prompt only
                    continue
                embeds = self.encode_visual(values, _frame_grids(grid_thw))
                slots = input_ids == token_id
                if int(slots.sum()) != embeds.shape[0]:
                    raise ValueError(
                        f"{int(slots.sum())} placeholder tokens {token_id} but {embeds.shape[0]} visual "
                        "embeddings; the prompt and the grid_thw disagree"
                    )
                inputs_embeds = inputs_embeds.masked_scatter(slots[..., None], embeds.to(inputs_embeds.dtype))
        b, s = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if position_ids is None or position_ids.dim() != 3:
            # generate() passes 1D text positions; M-RoPE needs the (3, B, S) ones of the visual grids.
            if past and self.next_position is not None:  # decoding: text continues after the prompt
                position_ids = (self.next_position[:, None] + torch.arange(s, device=device)).expand(3, b, s)
            elif input_ids is None:
                raise ValueError("position_ids are needed when only inputs_embeds are given")
            else:
                position_ids = self.get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask)
        self.next_position = position_ids.amax(dim=(0, 2)) + 1
        total = past + s
        # Causal over the cached prefix and the new tokens: query i (at past + i) sees keys j <= past + i.
        queries = torch.arange(past, total, device=device)[:, None]
        mask = (torch.arange(total, device=device)[None, :] <= queries)[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -total:].bool()
            # A fully padded query row would give NaN; let it attend to itself (its output is ignored).
            mask = mask | (torch.arange(total, device=device)[None, :] == queries)[None, None]
        hidden = self.model(inputs_embeds, position_ids, mask, cache)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        # transformers 5 names the cache field `cache`, transformers 4 `past_key_values`.
        fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
        name = "cache" if "cache" in fields else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **({name: cache} if use_cache else {}))


__all__ = ["KeyeVL1_5ForConditionalGeneration", "KeyeVL1_5PreTrainedModel"]
