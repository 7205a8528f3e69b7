"""Keye-VL-1.5 configuration for transformers (`trust_remote_code=True`), written by keye_train.

A flat config: the Qwen3 language-model fields at top level, the SigLIP vision tower in `vision_config`.
This file is standalone: it imports transformers only, so an exported folder works without keye_train.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class KeyeVL1_5VisionConfig(PretrainedConfig):
    """The native-resolution SigLIP vision tower with 2D RoPE."""

    model_type = "siglip_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 1152,
        intermediate_size: int = 4304,
        num_hidden_layers: int = 27,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 384,
        patch_size: int = 14,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        spatial_merge_size: int = 2,
        rope_theta: float = 10000.0,
        use_rope: bool = True,
        num_packing_positions: int = 32768,
        vision_use_head: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.spatial_merge_size = spatial_merge_size
        self.rope_theta = rope_theta
        self.use_rope = use_rope
        self.num_packing_positions = num_packing_positions
        self.vision_use_head = vision_use_head


class KeyeVL1_5Config(PretrainedConfig):
    """Keye-VL-1.5: SigLIP ViT -> 2x2-merge MLP projector (`mlp_AR`) -> Qwen3 decoder with M-RoPE."""

    model_type = "KeyeVL1_5"
    sub_configs = {"vision_config": KeyeVL1_5VisionConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vision_config: dict | KeyeVL1_5VisionConfig | None = None,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 12288,
        num_hidden_layers: int = 36,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        rope_theta: float = 1e6,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        image_token_id: int = 151655,
        video_token_id: int = 151656,
        vision_start_token_id: int = 151652,
        vision_end_token_id: int = 151653,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        if isinstance(vision_config, KeyeVL1_5VisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = KeyeVL1_5VisionConfig(**(vision_config or {}))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        # M-RoPE: the head_dim/2 frequencies split into T, H, W chunks (Keye-8B: 16, 24, 24).
        rope_scaling = dict(rope_scaling or {})
        half = head_dim // 2
        default_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        self.mrope_section = list(rope_scaling.get("mrope_section") or default_section)
        self.rope_theta = float(rope_theta)
        rope_scaling.setdefault("type", "default")
        rope_scaling.setdefault("rope_type", "default")
        rope_scaling["mrope_section"] = self.mrope_section
        self.rope_scaling = rope_scaling
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["KeyeVL1_5Config", "KeyeVL1_5VisionConfig"]
