"""Typed configs of the model components, validated at construction, and the model presets.

Presets: keye_8b (the released sizes), the pilot sizes keye_2b / keye_1b (SigLIP so400m with the public
Qwen3-1.7B / Qwen3-0.6B shapes), and tiny (tests and the CPU demo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "flex", "varlen")  # models/attention.py: BACKENDS


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_backend(name: str, key: str) -> None:
    _require(
        name in ATTENTION_BACKENDS,
        f"{key}={name!r} is not an attention backend; use one of {ATTENTION_BACKENDS}",
    )


@dataclass
class VisionConfig:
    """SigLIP ViT at native resolution (KEYE_SPEC: SigLIP-so400m-patch14-384)."""

    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    image_size: int = 384
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    use_rope: bool = True  # 2D RoPE on q/k; off reproduces plain SigLIP
    rope_theta: float = 10000.0
    # `packing_position_embedding`: unused by the VLM but carried through conversion; 0 when a checkpoint
    # (e.g. one written by the transformers port) has no such table.
    num_packing_positions: int = 32768
    use_head: bool = True  # the pooling head; used by the stage-0 sigmoid loss only
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        _require(
            self.hidden_size % self.num_heads == 0,
            f"vision.hidden_size={self.hidden_size} is not divisible by vision.num_heads={self.num_heads}",
        )
        _require(
            self.head_dim % 4 == 0,
            f"vision head_dim={self.head_dim} must be divisible by 4 for 2D RoPE (h and w halves)",
        )
        _require(
            self.image_size >= self.patch_size,
            f"vision.image_size={self.image_size} is smaller than patch_size={self.patch_size}",
        )
        _require(
            self.num_packing_positions >= 0,
            f"vision.num_packing_positions={self.num_packing_positions} must be >= 0 (0: no packing table)",
        )
        _require(self.rope_theta > 0, f"vision.rope_theta={self.rope_theta} must be positive")
        _check_backend(self.attn_backend, "vision.attn_backend")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_grid(self) -> int:
        """Side of the learned position table: floor(384 / 14) = 27, as SigLIP's conv drops the remainder."""
        return self.image_size // self.patch_size


@dataclass
class ProjectorConfig:
    """The 1.5 `mlp_AR` projector: 2x2 merge, LayerNorm, Linear, GELU, Linear."""

    vision_hidden_size: int = 1152
    text_hidden_size: int = 4096
    merge_size: int = 2
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _require(self.merge_size >= 1, f"projector.merge_size={self.merge_size} must be >= 1")

    @property
    def merged_size(self) -> int:
        return self.vision_hidden_size * self.merge_size**2


@dataclass
class LanguageConfig:
    """Qwen3 decoder with chunked M-RoPE."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 12288
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    # Longest context the model is meant for (stage 3 anneals at 128K); written to config.json for vLLM.
    max_position_embeddings: int = 131072
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        self.mrope_section = tuple(int(s) for s in self.mrope_section)
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"language.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
        )
        _require(
            len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
            f"language.mrope_section={list(self.mrope_section)} must have 3 parts summing to "
            f"head_dim/2={self.head_dim // 2}",
        )
        _require(self.rope_theta > 0, f"language.rope_theta={self.rope_theta} must be positive")
        _check_backend(self.attn_backend, "language.attn_backend")


@dataclass
class TextTowerConfig:
    """SigLIP text tower (stage 0 sigmoid loss)."""

    vocab_size: int = 32000
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    max_positions: int = 64
    projection_size: int = 1152
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _require(
            self.hidden_size % self.num_heads == 0,
            f"text_tower.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )


@dataclass
class KeyeConfig:
    """The composite Keye-VL-1.5 model. Token ids default to the Qwen vocabulary (KEYE_SPEC)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    text_tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    pad_token_id: int = 151643
    # Written to config.json / generation_config.json; generation stops at eos (<|im_end|> in ChatML).
    # None (unknown) by default so that configs recorded before these fields existed still load; the
    # Qwen-vocabulary presets set them and runs take them from the tokenizer.
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        _require(
            self.projector.vision_hidden_size == self.vision.hidden_size,
            f"projector.vision_hidden_size={self.projector.vision_hidden_size} != "
            f"vision.hidden_size={self.vision.hidden_size}",
        )
        _require(
            self.projector.text_hidden_size == self.language.hidden_size,
            f"projector.text_hidden_size={self.projector.text_hidden_size} != "
            f"language.hidden_size={self.language.hidden_size}",
        )
        for name in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "bos_token_id",
            "eos_token_id",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            _require(
                0 <= value < self.language.vocab_size,
                f"{name}={value} is outside the vocabulary (vocab_size={self.language.vocab_size})",
            )


QWEN_BOS, QWEN_EOS = 151643, 151645  # <|endoftext|>, <|im_end|>


def keye_8b() -> KeyeConfig:
    """The released Keye-VL-1.5-8B sizes."""
    return KeyeConfig(bos_token_id=QWEN_BOS, eos_token_id=QWEN_EOS)


def _qwen3(*, hidden: int, layers: int, intermediate: int) -> LanguageConfig:
    """A public Qwen3 dense shape: 16 query heads, 8 KV heads, head_dim 128, vocab 151936, base 1e6."""
    return LanguageConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=intermediate,
    )


def _pilot(language: LanguageConfig) -> KeyeConfig:
    return KeyeConfig(
        projector=ProjectorConfig(text_hidden_size=language.hidden_size),
        language=language,
        bos_token_id=QWEN_BOS,
        eos_token_id=QWEN_EOS,
    )


def keye_2b() -> KeyeConfig:
    """Pilot size: SigLIP so400m + Qwen3-1.7B (hidden 2048, 28 layers, MLP 6144), lm_head untied."""
    return _pilot(_qwen3(hidden=2048, layers=28, intermediate=6144))


def keye_1b() -> KeyeConfig:
    """Pilot size: SigLIP so400m + Qwen3-0.6B (hidden 1024, 28 layers, MLP 3072), lm_head untied."""
    return _pilot(_qwen3(hidden=1024, layers=28, intermediate=3072))


def tiny(*, vocab_size: int = 512, text_vocab_size: int = 256) -> KeyeConfig:
    """A few-MB model with every structural feature of the 8B (GQA 2:1, M-RoPE, 2D RoPE) for tests/demo.

    Token ids sit at the top of the vocabulary, where the synthetic tokenizer puts its special tokens.
    """
    vision = VisionConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=112,
        num_packing_positions=64,
    )
    language = LanguageConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        mrope_section=(2, 3, 3),
    )
    return KeyeConfig(
        vision=vision,
        projector=ProjectorConfig(vision_hidden_size=32, text_hidden_size=64),
        language=language,
        text_tower=TextTowerConfig(
            vocab_size=text_vocab_size,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            max_positions=16,
            projection_size=32,
        ),
        image_token_id=vocab_size - 2,
        video_token_id=vocab_size - 1,
        vision_start_token_id=vocab_size - 4,
        vision_end_token_id=vocab_size - 3,
        pad_token_id=0,
    )


PRESETS = {"keye_8b": keye_8b, "keye_2b": keye_2b, "keye_1b": keye_1b, "tiny": tiny}


def preset(name: str) -> KeyeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
