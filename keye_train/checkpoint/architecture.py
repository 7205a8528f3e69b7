"""The architecture (KeyeConfig) a checkpoint implies: an HF Keye-VL-1.5, Qwen3 or SigLIP folder, or a
keye_train run / stage / step directory. Used to build exactly the model whose weights get loaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from keye_train.checkpoint.hf import (
    KIND_KEYE,
    KIND_QWEN3,
    KIND_SIGLIP,
    detect_kind,
    language_config_from_qwen3,
    load_keye_config,
    read_config,
    text_tower_config_from_siglip,
    vision_config_from_siglip,
)
from keye_train.checkpoint.safetensors_io import read_layout
from keye_train.models.configs import KeyeConfig

PACKING_KEY = "vision_model.embeddings.packing_position_embedding.weight"


def _hf_kind(directory: Path) -> tuple[str, dict]:
    config = read_config(directory)
    layout = read_layout(directory)
    return detect_kind({k: v.shape for k, v in layout.items()}, config), config


def architecture_from_hf(directory: str | Path, *, base: KeyeConfig) -> KeyeConfig:
    """`model.from_hf`: a Keye-VL-1.5 folder gives the whole architecture; a Qwen3 folder the LLM and a
    SigLIP folder the ViT (and text tower), the rest coming from `base` (the preset), with the projector
    joining the two widths."""
    directory = Path(directory)
    kind, config = _hf_kind(directory)
    if kind == KIND_KEYE:
        return load_keye_config(directory)
    if kind == KIND_QWEN3:
        language = language_config_from_qwen3(config)
        projector = dataclasses.replace(base.projector, text_hidden_size=language.hidden_size)
        return dataclasses.replace(base, language=language, projector=projector)
    if kind == KIND_SIGLIP:
        vision = vision_config_from_siglip(config)
        layout = read_layout(directory)
        vision.num_packing_positions = layout[PACKING_KEY].shape[0] if PACKING_KEY in layout else 0
        projector = dataclasses.replace(base.projector, vision_hidden_size=vision.hidden_size)
        tower = text_tower_config_from_siglip(config) if "text_config" in config else base.text_tower
        return dataclasses.replace(base, vision=vision, projector=projector, text_tower=tower)
    raise ValueError(
        f"model.from_hf={directory} holds a {kind} checkpoint; give a Keye-VL-1.5, Qwen3 or SigLIP folder"
    )


def architecture_of_checkpoint(path: str | Path) -> KeyeConfig | None:
    """The KeyeConfig `stage.init_from` carries: a Keye-VL-1.5 HF folder's, or the one a keye_train run
    recorded in its checkpoint. None for a path that records none (the loader then reports it)."""
    from keye_train.checkpoint.dcp import resolve_checkpoint, saved_keye_config

    path = Path(path)
    if (path / "config.json").is_file() and not (path / ".metadata").exists():
        kind, _ = _hf_kind(path)
        return load_keye_config(path) if kind == KIND_KEYE else None
    try:
        return saved_keye_config(resolve_checkpoint(path, log=lambda _: None))
    except ValueError:
        return None


def describe(cfg: KeyeConfig) -> str:
    """A one-line size summary for messages."""
    v, lang = cfg.vision, cfg.language
    return (
        f"ViT {v.hidden_size}x{v.num_layers}, LLM {lang.hidden_size}x{lang.num_layers} "
        f"(heads {lang.num_heads}/{lang.num_kv_heads}, MLP {lang.intermediate_size}, "
        f"vocab {lang.vocab_size}), "
        f"RoPE base {lang.rope_theta:g}"
    )
