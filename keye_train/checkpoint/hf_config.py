"""Keye-VL-1.5 config.json <-> KeyeConfig, and reading SigLIP / Qwen3 config.json files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from keye_train.checkpoint.safetensors_io import dtype_name, parse_dtype
from keye_train.models.configs import (
    KeyeConfig,
    LanguageConfig,
    ProjectorConfig,
    TextTowerConfig,
    VisionConfig,
)

KEYE_ARCH = "KeyeVL1_5ForConditionalGeneration"
PREVIEW_ARCH = "KeyeForConditionalGeneration"
KEYE_MODEL_TYPE = "KeyeVL1_5"  # UNVERIFIED against the released config; readers accept any "keye*" type
TEXT_TOWER_DIR = "siglip_text"

_TOKEN_ID_FIELDS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "pad_token_id",
)

# transformers omits fields equal to its defaults when saving SigLIP sub-configs (google's published
# configs list only a few), so a reader must know those defaults.
_SIGLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, "vision_use_head": True,
}  # fmt: skip
# What the Keye team's transformers port assumes for LLM fields a Keye config.json leaves out (KEYE_SPEC:
# "Reading a config.json as the reference implementation does"); a Qwen3 config.json takes Qwen3Config's.
KEYE_TEXT_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768}
QWEN3_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768}
VISION_ROPE_THETA = 10000.0  # vision_config.rope_theta when absent
HEAD_PREFIX = "visual.vision_model.head."
PACKING_KEY = "visual.vision_model.embeddings.packing_position_embedding.weight"
# Remote code shipped with every export (keye_train/checkpoint/remote/); config.json points at it.
AUTO_MAP = {
    "AutoConfig": "configuration_keye_vl1_5.KeyeVL1_5Config",
    "AutoModel": "modeling_keye_vl1_5.KeyeVL1_5ForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_keye_vl1_5.KeyeVL1_5ForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_keye_vl1_5.KeyeVL1_5ForConditionalGeneration",
    "AutoProcessor": "processing_keye_vl1_5.KeyeVL1_5Processor",
}
_SIGLIP_TEXT_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 64, "layer_norm_eps": 1e-6,
}  # fmt: skip


def read_config(directory: str | Path) -> dict[str, Any]:
    """config.json of a model dir, with an error naming the file when absent or broken."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a Hugging Face model dir needs its config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _get(config: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    value = config.get(key)
    return defaults[key] if value is None else value


def vision_config_from_siglip(config: Mapping[str, Any]) -> VisionConfig:
    """VisionConfig from a SiglipVisionConfig dict (or a SiglipConfig dict holding `vision_config`)."""
    vision = config.get("vision_config", config)
    get = lambda key: _get(vision, _SIGLIP_VISION_DEFAULTS, key)
    kwargs: dict[str, Any] = {}
    if vision.get("num_packing_positions") is not None:
        kwargs["num_packing_positions"] = int(vision["num_packing_positions"])
    return VisionConfig(
        hidden_size=get("hidden_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        intermediate_size=get("intermediate_size"),
        patch_size=get("patch_size"),
        image_size=get("image_size"),
        num_channels=get("num_channels"),
        layer_norm_eps=get("layer_norm_eps"),
        use_head=bool(get("vision_use_head")),
        rope_theta=float(vision.get("rope_theta") or VISION_ROPE_THETA),
        **kwargs,
    )


def text_tower_config_from_siglip(config: Mapping[str, Any]) -> TextTowerConfig:
    """TextTowerConfig from a SiglipTextConfig dict (or a SiglipConfig dict holding `text_config`)."""
    text = config.get("text_config", config)
    get = lambda key: _get(text, _SIGLIP_TEXT_DEFAULTS, key)
    return TextTowerConfig(
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        intermediate_size=get("intermediate_size"),
        max_positions=get("max_position_embeddings"),
        projection_size=text.get("projection_size") or get("hidden_size"),
        layer_norm_eps=get("layer_norm_eps"),
    )


def default_mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Keye's [16, 24, 24] for head_dim 128, scaled for other sizes: T a quarter, H and W the rest."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return (t, h, half - t - h)


def language_config_from_qwen3(
    config: Mapping[str, Any], *, defaults: Mapping[str, Any] = QWEN3_DEFAULTS
) -> LanguageConfig:
    """LanguageConfig from a Qwen3Config dict or the flat LLM fields of a Keye config.json.

    `defaults` fill absent fields: QWEN3_DEFAULTS (Qwen3Config's) or KEYE_TEXT_DEFAULTS (the Keye port's).
    """
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        if k not in config
    ]
    if missing:
        raise ValueError(f"config lacks the LLM fields {missing}; is this a Qwen3 / Keye config.json?")
    rope = config.get("rope_scaling") or {}
    parameters = config.get("rope_parameters") or {}  # transformers 5 spelling
    theta = (
        config.get("rope_theta")
        or parameters.get("rope_theta")
        or rope.get("rope_theta")
        or defaults["rope_theta"]
    )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    section = rope.get("mrope_section") or parameters.get("mrope_section") or default_mrope_section(head_dim)
    return LanguageConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=head_dim,
        intermediate_size=config["intermediate_size"],
        rms_norm_eps=float(_get(config, defaults, "rms_norm_eps")),
        rope_theta=float(theta),
        mrope_section=tuple(section),
        max_position_embeddings=int(_get(config, defaults, "max_position_embeddings")),
    )


def keye_config_to_hf(
    cfg: KeyeConfig, *, dtype: str | torch.dtype = "bfloat16", extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The flat Keye-VL-1.5 config.json: Qwen3 LLM fields at top level, SigLIP fields in `vision_config`.

    `extra` adds fields keye_train does not model (e.g. bos/eos ids, max_position_embeddings of the
    source Qwen3 config); it never overrides a mapped field.
    """
    lang, vis = cfg.language, cfg.vision
    out: dict[str, Any] = {
        "architectures": [KEYE_ARCH],
        "model_type": KEYE_MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "vocab_size": lang.vocab_size,
        "hidden_size": lang.hidden_size,
        "intermediate_size": lang.intermediate_size,
        "num_hidden_layers": lang.num_layers,
        "num_attention_heads": lang.num_heads,
        "num_key_value_heads": lang.num_kv_heads,
        "head_dim": lang.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": lang.rms_norm_eps,
        "rope_theta": lang.rope_theta,
        "max_position_embeddings": lang.max_position_embeddings,
        "rope_scaling": {
            "type": "default",
            "rope_type": "default",
            "mrope_section": list(lang.mrope_section),
        },
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": dtype_name(parse_dtype(dtype)),
        **{name: getattr(cfg, name) for name in _TOKEN_ID_FIELDS},
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": vis.hidden_size,
            "intermediate_size": vis.intermediate_size,
            "num_hidden_layers": vis.num_layers,
            "num_attention_heads": vis.num_heads,
            "num_channels": vis.num_channels,
            "image_size": vis.image_size,
            "patch_size": vis.patch_size,
            "layer_norm_eps": vis.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": vis.use_head,
            "spatial_merge_size": cfg.projector.merge_size,
            "num_packing_positions": vis.num_packing_positions,
            "rope_theta": vis.rope_theta,
            "use_rope": vis.use_rope,
        },
    }
    for key, value in (extra or {}).items():
        out.setdefault(key, value)
    return out


def keye_config_from_hf(
    config: Mapping[str, Any],
    *,
    text_tower: Mapping[str, Any] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> KeyeConfig:
    """KeyeConfig from a Keye-VL-1.5 config.json (plus the SigLIP text config of `siglip_text/`).

    `shapes` (checkpoint key -> shape) fills what a released config.json does not state: the size of the
    unused packing position table.
    """
    architectures = list(config.get("architectures") or [])
    model_type = str(config.get("model_type", ""))
    if PREVIEW_ARCH in architectures:
        raise ValueError(
            f"config.json architectures={architectures} is a Keye-VL-Preview model; keye_train reads "
            f"Keye-VL-1.5 ({KEYE_ARCH}) checkpoints only"
        )
    if KEYE_ARCH not in architectures and not model_type.lower().startswith("keye"):
        raise ValueError(
            f"config.json architectures={architectures} model_type={model_type!r} is not Keye-VL-1.5; "
            f"expected architectures [{KEYE_ARCH!r}]"
        )
    if "vision_config" not in config:
        raise ValueError(
            "the Keye config.json has no `vision_config`; it is not a complete Keye-VL-1.5 config"
        )
    vision = vision_config_from_siglip(config["vision_config"])
    if "use_rope" in config["vision_config"]:
        vision.use_rope = bool(config["vision_config"]["use_rope"])
    if shapes is not None:
        # The tensors decide whether the unused packing table and pooling head exist: the transformers
        # port writes checkpoints without them, the released one has both.
        packing = shapes.get(PACKING_KEY)
        vision.num_packing_positions = int(packing[0]) if packing is not None else 0
        vision.use_head = any(k.startswith(HEAD_PREFIX) for k in shapes)
    language = language_config_from_qwen3(config, defaults=KEYE_TEXT_DEFAULTS)
    projector = ProjectorConfig(
        vision_hidden_size=vision.hidden_size,
        text_hidden_size=language.hidden_size,
        merge_size=int(config["vision_config"].get("spatial_merge_size", 2)),
    )
    tower = text_tower_config_from_siglip(text_tower) if text_tower is not None else TextTowerConfig()
    ids = {name: config[name] for name in _TOKEN_ID_FIELDS if config.get(name) is not None}
    for name in ("bos_token_id", "eos_token_id"):
        value = config.get(name)
        if isinstance(value, list):  # generation configs may list several eos ids; the first is ChatML's
            value = value[0] if value else None
        ids[name] = value
    return KeyeConfig(vision=vision, projector=projector, language=language, text_tower=tower, **ids)
