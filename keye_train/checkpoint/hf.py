"""Hugging Face Keye-VL-1.5 checkpoints: model-kind detection, layout checks, sharded save and load."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keye_train.checkpoint.hf_config import (
    KEYE_ARCH,
    PREVIEW_ARCH,
    TEXT_TOWER_DIR,
    keye_config_from_hf,
    keye_config_to_hf,
    language_config_from_qwen3,
    read_config,
    text_tower_config_from_siglip,
    vision_config_from_siglip,
)
from keye_train.checkpoint.kill_points import kill_point
from keye_train.checkpoint.safetensors_io import (
    ShardedWriter,
    TensorInfo,
    checkpoint_files,
    iter_checkpoint,
    iter_shard,
    parse_dtype,
    read_layout,
)
from keye_train.checkpoint.staging import atomic_output_dir
from keye_train.models.configs import KeyeConfig, TextTowerConfig

# The config mapping is re-exported: callers use this module as the one HF entry point.
__all__ = [
    "KEYE_ARCH",
    "KIND_KEYE",
    "KIND_PREVIEW",
    "KIND_QWEN3",
    "KIND_SIGLIP",
    "KIND_UNKNOWN",
    "PREVIEW_ARCH",
    "TEXT_TOWER_DIR",
    "compare_layout",
    "detect_kind",
    "expected_keye_layout",
    "expected_text_tower_layout",
    "keye_config_from_hf",
    "keye_config_to_hf",
    "language_config_from_qwen3",
    "layout_error",
    "load_into_model",
    "load_keye_config",
    "load_keye_state",
    "meta_state_shapes",
    "read_config",
    "save_keye_hf",
    "write_keye_hf",
    "text_tower_config_from_siglip",
    "vision_config_from_siglip",
]

KIND_KEYE = "keye-1.5"
KIND_PREVIEW = "keye-preview"
KIND_QWEN3 = "qwen3"
KIND_SIGLIP = "siglip"
KIND_UNKNOWN = "unknown"


def _is_preview_projector(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    pre_norm = shapes.get("mlp_AR.pre_norm.weight")
    vision = shapes.get("visual.vision_model.post_layernorm.weight")
    return pre_norm is not None and vision is not None and pre_norm[0] == vision[0]


def detect_kind(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any] | None = None) -> str:
    """keye-1.5 / keye-preview / qwen3 / siglip / unknown, from checkpoint keys (and config.json)."""
    config = config or {}
    architectures = list(config.get("architectures") or [])
    if any(k.startswith(("visual.", "mlp_AR.")) for k in shapes):
        # The Preview projector normalises each 1152-d patch before the 2x2 merge, 1.5 the merged 4x vector.
        if _is_preview_projector(shapes) or (
            PREVIEW_ARCH in architectures and KEYE_ARCH not in architectures
        ):
            return KIND_PREVIEW
        return KIND_KEYE
    if any(k.startswith(("vision_model.", "text_model.")) for k in shapes):
        return KIND_SIGLIP
    # q_norm tells Qwen3 from Qwen2 / Llama, whose keys are otherwise the same.
    if "model.embed_tokens.weight" in shapes and any(k.endswith("self_attn.q_norm.weight") for k in shapes):
        return KIND_QWEN3
    return KIND_UNKNOWN


def meta_state_shapes(module_factory: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of a module built on the meta device (no memory)."""
    with torch.device("meta"):
        module = module_factory()
    return {key: tuple(t.shape) for key, t in module.state_dict().items()}


def expected_keye_layout(cfg: KeyeConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of our KeyeForConditionalGeneration for `cfg`, built on the meta device (no memory)."""
    from keye_train.models.keye import KeyeForConditionalGeneration

    return meta_state_shapes(lambda: KeyeForConditionalGeneration(cfg))


def expected_text_tower_layout(cfg: TextTowerConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the SigLIP text tower (`text_model.*`, logit_scale, logit_bias)."""
    from keye_train.models.siglip_text import SiglipTextTower

    return meta_state_shapes(lambda: SiglipTextTower(cfg))


def compare_layout(
    found: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched) where mismatched entries read 'file: key shape X, expected Y'."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(f"{found[k].file.name}: {k}" for k in set(found) - set(expected))
    mismatched = sorted(
        f"{found[k].file.name}: {k} has shape {list(found[k].shape)}, expected {list(expected[k])}"
        for k in set(found) & set(expected)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    return missing, unexpected, mismatched


def layout_error(
    directory: str | Path,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    *,
    what: str = "the Keye-VL-1.5 layout of its config",
) -> str:
    """One message listing what disagrees (first few of each), for a ValueError."""
    parts = []
    for label, items in (
        ("shape mismatch", mismatched),
        ("unexpected key", unexpected),
        ("missing key", missing),
    ):
        if items:
            more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {'; '.join(items[:3])}{more}")
    return f"checkpoint {directory} does not match {what}: " + " | ".join(parts)


def _require_keye(directory: Path, layout: Mapping[str, TensorInfo], config: Mapping[str, Any]) -> None:
    shapes = {k: v.shape for k, v in layout.items()}
    kind = detect_kind(shapes, config)
    if kind == KIND_PREVIEW:
        info = layout.get("mlp_AR.pre_norm.weight")
        where = f"{info.file}: mlp_AR.pre_norm.weight has shape {list(info.shape)}" if info else "config.json"
        raise ValueError(
            f"{where}: this is a Keye-VL-Preview checkpoint (projector LayerNorm before the 2x2 merge), not "
            "Keye-VL-1.5 (LayerNorm over the merged 4x vision width); use a Keye-VL-1.5 checkpoint"
        )
    if kind != KIND_KEYE:
        raise ValueError(
            f"{directory} holds a {kind} checkpoint, not Keye-VL-1.5 (no visual.* / mlp_AR.* keys)"
        )


def load_keye_config(directory: str | Path) -> KeyeConfig:
    """KeyeConfig of a Keye-VL-1.5 HF dir (checks the kind; reads `siglip_text/config.json` if present)."""
    directory = Path(directory)
    config = read_config(directory)
    layout = read_layout(directory)
    _require_keye(directory, layout, config)
    tower_dir = directory / TEXT_TOWER_DIR
    tower = read_config(tower_dir) if (tower_dir / "config.json").is_file() else None
    return keye_config_from_hf(config, text_tower=tower, shapes={k: v.shape for k, v in layout.items()})


def load_keye_state(directory: str | Path) -> tuple[KeyeConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(KeyeConfig, lazy (key, tensor) iterator read shard by shard) of a Keye-VL-1.5 HF dir."""
    cfg = load_keye_config(directory)
    return cfg, iter_checkpoint(directory)


def save_keye_hf(
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    cfg: KeyeConfig,
    out_dir: str | Path,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_bytes: int = 5 * 10**9,
    extra_config: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """write_keye_hf into a staging dir renamed to `out_dir` when complete (nothing at `out_dir` on any
    error)."""
    with atomic_output_dir(out_dir, log=log or print) as temp:
        files = write_keye_hf(
            state,
            cfg=cfg,
            directory=temp,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            extra_config=extra_config,
            log=log,
        )
    return [Path(out_dir) / f.name for f in files]


def write_keye_hf(
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    cfg: KeyeConfig,
    directory: Path,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_bytes: int = 5 * 10**9,
    extra_config: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """A Keye-VL-1.5 HF model (config.json + sharded safetensors + index) written into `directory`, a
    conversion's staging dir.

    Tensors are checked against the layout of `cfg` as they stream in; any disagreement raises. Only one
    output shard is held in memory.
    """
    expected = expected_keye_layout(cfg)
    items = state.items() if isinstance(state, Mapping) else state
    torch_dtype = parse_dtype(dtype)
    writer = ShardedWriter(directory, max_shard_bytes=max_shard_bytes, dtype=torch_dtype, log=log)
    seen: set[str] = set()
    for key, tensor in items:
        if key not in expected:
            raise ValueError(f"tensor {key!r} is not part of the Keye-VL-1.5 layout; nothing was written")
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"tensor {key!r} has shape {list(tensor.shape)}, the config needs {list(expected[key])}"
            )
        writer.add(key, tensor)
        seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{len(missing)} Keye-VL-1.5 tensors were not given, e.g. {missing[:3]}")
    files = writer.close()
    config = keye_config_to_hf(cfg, dtype=torch_dtype, extra=extra_config)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    kill_point("weights.written")
    return files


@torch.no_grad()
def load_into_model(
    model: nn.Module, directory: str | Path, *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy a HF checkpoint into `model` shard by shard; returns (missing, unexpected) keys.

    Every key and shape is checked from the safetensors headers before any data is read, so a bad
    checkpoint fails with one error naming file and key and leaves the model untouched. Parameters still
    on the meta device are replaced by the loaded tensors (cast to the parameter's dtype); materialised
    ones are copied into in place.
    """
    directory = Path(directory)
    found = read_layout(directory)
    targets = model.state_dict(keep_vars=True)
    missing, unexpected, mismatched = compare_layout(found, {k: tuple(t.shape) for k, t in targets.items()})
    if mismatched or (strict and (missing or unexpected)):
        raise ValueError(layout_error(directory, missing, unexpected if strict else [], mismatched))
    for file in checkpoint_files(directory):
        shard: dict[str, torch.Tensor] = {}
        for key, tensor in iter_shard(file):
            if key in targets:
                target = targets[key]
                device = target.device if target.device.type != "meta" else tensor.device
                shard[key] = tensor.to(device=device, dtype=target.dtype)
        on_meta = any(targets[k].device.type == "meta" for k in shard)
        model.load_state_dict(shard, strict=False, assign=on_meta)
        del shard
    return missing, sorted(k.split(": ", 1)[1] for k in unexpected)
