"""Building a Keye-VL-1.5 HF checkpoint from SigLIP + Qwen3 Hugging Face checkpoints (`keye-convert init`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keye_train.checkpoint.hf import (
    KIND_QWEN3,
    KIND_SIGLIP,
    TEXT_TOWER_DIR,
    compare_layout,
    detect_kind,
    expected_keye_layout,
    expected_text_tower_layout,
    keye_config_to_hf,
    language_config_from_qwen3,
    layout_error,
    read_config,
    text_tower_config_from_siglip,
    vision_config_from_siglip,
)
from keye_train.checkpoint.hf_config import PACKING_KEY
from keye_train.checkpoint.safetensors_io import (
    ShardedWriter,
    TensorInfo,
    checkpoint_files,
    iter_shard,
    parse_dtype,
    read_layout,
)
from keye_train.checkpoint.staging import atomic_output_dir
from keye_train.models.configs import KeyeConfig, ProjectorConfig

# Fields of the source Qwen3 config.json that keye_train does not model but inference stacks read.
_QWEN3_PASSTHROUGH = ("bos_token_id", "eos_token_id", "max_position_embeddings", "initializer_range")
_TOKENIZER_NAMES = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "pad_token_id": "<|endoftext|>",
}


@dataclass
class InitSummary:
    """What `init_from_siglip_qwen3` did, for the printed summary and for tests."""

    cfg: KeyeConfig
    copied: int = 0
    created: list[str] = field(default_factory=list)
    text_tower_tensors: int = 0


def _require_kind(
    directory: Path, want: str, config: Mapping[str, Any], layout: Mapping[str, TensorInfo]
) -> None:
    kind = detect_kind({k: v.shape for k, v in layout.items()}, config)
    if kind != want:
        first = next(iter(layout.values())).file if layout else directory
        raise ValueError(
            f"{directory} should hold a {want} checkpoint but holds a {kind} one (config.json architectures="
            f"{config.get('architectures')}, model_type={config.get('model_type')!r}, keys of {first.name})"
        )


def token_ids_from_tokenizer(directory: Path) -> dict[str, int]:
    """Ids of the vision special tokens from tokenizer_config.json's added_tokens_decoder, when present."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    decoder = json.loads(path.read_text()).get("added_tokens_decoder") or {}
    by_content = {entry.get("content"): int(token_id) for token_id, entry in decoder.items()}
    return {field_: by_content[name] for field_, name in _TOKENIZER_NAMES.items() if name in by_content}


def init_config(
    *, siglip: Mapping[str, Any], qwen3: Mapping[str, Any], token_ids: Mapping[str, int] | None = None
) -> KeyeConfig:
    """KeyeConfig for a SigLIP (SiglipConfig dict) + Qwen3 (Qwen3Config dict) pair.

    Token ids default to the Qwen vocabulary ids of KEYE_SPEC; `token_ids` overrides them.
    """
    if "vision_config" not in siglip or "text_config" not in siglip:
        raise ValueError(
            "the SigLIP config.json needs both vision_config and text_config (a full SiglipModel): the "
            "text tower is converted too, for stage 0"
        )
    vision = vision_config_from_siglip(siglip)
    language = language_config_from_qwen3(qwen3)
    # bos/eos are the Qwen3 config's (absent: unknown), so the export carries what the LLM was trained with.
    special = {name: _first(qwen3.get(name)) for name in ("bos_token_id", "eos_token_id")}
    projector = ProjectorConfig(vision_hidden_size=vision.hidden_size, text_hidden_size=language.hidden_size)
    try:
        return KeyeConfig(
            vision=vision,
            projector=projector,
            language=language,
            text_tower=text_tower_config_from_siglip(siglip),
            **(special | dict(token_ids or {})),
        )
    except ValueError as err:
        if "token_id" not in str(err):
            raise
        raise ValueError(
            f"{err}: pass --token-ids, or keep the Qwen3 tokenizer_config.json beside its weights"
        ) from err


def _first(value: Any) -> int | None:
    """A token id, or the first of a list of them (Qwen3 generation configs list several eos ids)."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def check_preset_sizes(cfg: KeyeConfig, preset_cfg: KeyeConfig) -> None:
    """Raise unless the sources have the sizes of `preset_cfg` (the projector joins vision and LLM widths)."""
    pairs = [
        (
            "SigLIP vision hidden_size (projector input, merged 2x2)",
            cfg.vision.hidden_size,
            preset_cfg.vision.hidden_size,
        ),
        ("Qwen3 hidden_size (projector output)", cfg.language.hidden_size, preset_cfg.language.hidden_size),
        ("SigLIP vision num_hidden_layers", cfg.vision.num_layers, preset_cfg.vision.num_layers),
        ("Qwen3 num_hidden_layers", cfg.language.num_layers, preset_cfg.language.num_layers),
        ("Qwen3 vocab_size", cfg.language.vocab_size, preset_cfg.language.vocab_size),
    ]
    for what, got, want in pairs:
        if got != want:
            raise ValueError(
                f"{what} is {got} but the preset needs {want}; pick matching SigLIP/Qwen3 models"
            )


def init_from_siglip_qwen3(
    *,
    siglip_dir: str | Path,
    qwen3_dir: str | Path,
    out_dir: str | Path,
    dtype: str | torch.dtype = "bfloat16",
    seed: int = 0,
    max_shard_bytes: int = 5 * 10**9,
    token_ids: Mapping[str, int] | None = None,
    preset_cfg: KeyeConfig | None = None,
    log: Callable[[str], None] = print,
) -> InitSummary:
    """Write a Keye-VL-1.5 HF dir from a HF SigLIP (vision + text) dir and a HF Qwen3 dir.

    vision_model.* -> visual.vision_model.*, Qwen3 keys unchanged, a freshly initialised projector, and
    the text tower (text_model.*, logit_scale, logit_bias) in OUT/siglip_text/. Everything is checked
    against the layout of our model; on any error nothing is left at `out_dir`.
    """
    siglip_dir, qwen3_dir = Path(siglip_dir), Path(qwen3_dir)
    siglip_config, qwen3_config = read_config(siglip_dir), read_config(qwen3_dir)
    siglip_layout, qwen3_layout = read_layout(siglip_dir), read_layout(qwen3_dir)
    _require_kind(siglip_dir, KIND_SIGLIP, siglip_config, siglip_layout)
    _require_kind(qwen3_dir, KIND_QWEN3, qwen3_config, qwen3_layout)
    ids = token_ids_from_tokenizer(qwen3_dir) | dict(token_ids or {})
    cfg = init_config(siglip=siglip_config, qwen3=qwen3_config, token_ids=ids)
    if "vision_model.embeddings.packing_position_embedding.weight" in siglip_layout:
        shape = siglip_layout["vision_model.embeddings.packing_position_embedding.weight"].shape
        cfg.vision.num_packing_positions = shape[0]
    if preset_cfg is not None:
        check_preset_sizes(cfg, preset_cfg)
    expected = expected_keye_layout(cfg)
    expected_text = expected_text_tower_layout(cfg.text_tower)
    _precheck(siglip_dir, siglip_layout, qwen3_dir, qwen3_layout, qwen3_config, expected, expected_text)
    torch_dtype = parse_dtype(dtype)
    summary = InitSummary(cfg=cfg)

    def checked(key: str, tensor: torch.Tensor, layout: Mapping[str, tuple[int, ...]], source: Path) -> None:
        if key not in layout:
            raise ValueError(f"{source}: key {key!r} has no place in the Keye-VL-1.5 layout of this config")
        if tuple(tensor.shape) != layout[key]:
            raise ValueError(
                f"{source}: key {key!r} has shape {list(tensor.shape)}, but {list(layout[key])} is expected "
                "from the config.json sizes"
            )

    with atomic_output_dir(out_dir, log=log) as temp:
        writer = ShardedWriter(
            temp, max_shard_bytes=max_shard_bytes, dtype=torch_dtype, log=log, label="keye"
        )
        text_writer = ShardedWriter(
            temp / TEXT_TOWER_DIR,
            max_shard_bytes=max_shard_bytes,
            dtype=torch_dtype,
            log=log,
            label=TEXT_TOWER_DIR,
        )
        for file in checkpoint_files(siglip_dir):
            log(f"[siglip] reading {file.name}")
            for key, tensor in iter_shard(file):
                if key.startswith("vision_model."):
                    new_key = "visual." + key
                    checked(new_key, tensor, expected, file)
                    writer.add(new_key, tensor)
                    summary.copied += 1
                else:  # text_model.*, logit_scale, logit_bias
                    checked(key, tensor, expected_text, file)
                    text_writer.add(key, tensor)
                    summary.text_tower_tensors += 1
        if PACKING_KEY not in writer.keys and PACKING_KEY in expected:
            # Google's SigLIP has no packing table; Keye's checkpoint carries one that the VLM never reads.
            # Zeros make it deterministic and inert should any code path ever look positions up in it.
            writer.add(PACKING_KEY, torch.zeros(expected[PACKING_KEY]))
            summary.created.append(
                f"{PACKING_KEY} {list(expected[PACKING_KEY])} as zeros (unused by the VLM)"
            )
        log(f"[projector] initialising mlp_AR.* from seed {seed}")
        projector = init_projector(cfg.projector, seed=seed)
        for key, tensor in projector.items():
            writer.add("mlp_AR." + key, tensor)
        summary.created.append(
            f"mlp_AR.* ({len(projector)} tensors) freshly initialised from seed {seed} (init_weights: "
            "normal std 0.02 linears, LayerNorm ones/zeros)"
        )
        for file in checkpoint_files(qwen3_dir):
            log(f"[qwen3] reading {file.name}")
            for key, tensor in iter_shard(file):
                checked(key, tensor, expected, file)
                writer.add(key, tensor)
                summary.copied += 1
        if "lm_head.weight" not in writer.keys and qwen3_config.get("tie_word_embeddings"):
            # Small Qwen3 models tie lm_head to the embeddings and store it once; Keye unties them.
            embed = qwen3_layout["model.embed_tokens.weight"].file
            writer.add(
                "lm_head.weight", next(t for k, t in iter_shard(embed) if k == "model.embed_tokens.weight")
            )
            summary.created.append("lm_head.weight copied from model.embed_tokens.weight (Qwen3 ties them)")
        for keys, layout, where in (
            (writer.keys, expected, "Keye"),
            (text_writer.keys, expected_text, "text"),
        ):
            missing = sorted(set(layout) - keys)
            if missing:
                raise ValueError(
                    f"the sources lack {len(missing)} tensors of the {where} layout, e.g. {missing[:3]} "
                    f"(looked in {siglip_dir} and {qwen3_dir})"
                )
        writer.close()
        text_writer.close()
        extra = {k: qwen3_config[k] for k in _QWEN3_PASSTHROUGH if k in qwen3_config}
        config = keye_config_to_hf(cfg, dtype=torch_dtype, extra=extra)
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (temp / TEXT_TOWER_DIR / "config.json").write_text(
            json.dumps(text_tower_hf_config(siglip_config), indent=2)
        )
    return summary


def _precheck(
    siglip_dir: Path,
    siglip_layout: Mapping[str, TensorInfo],
    qwen3_dir: Path,
    qwen3_layout: Mapping[str, TensorInfo],
    qwen3_config: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    expected_text: Mapping[str, tuple[int, ...]],
) -> None:
    """Check every source key and shape from the headers alone, so a bad source fails before any write."""
    vision = {"visual." + k: v for k, v in siglip_layout.items() if k.startswith("vision_model.")}
    text = {k: v for k, v in siglip_layout.items() if not k.startswith("vision_model.")}
    # Tensors init creates itself are not expected from the sources.
    created = {k for k in expected if k.startswith("mlp_AR.")} | {PACKING_KEY}
    if qwen3_config.get("tie_word_embeddings"):
        created.add("lm_head.weight")
    checks = (
        (siglip_dir, vision, {k: v for k, v in expected.items() if k.startswith("visual.")}, "its vision"),
        (siglip_dir, text, expected_text, "its text tower"),
        (
            qwen3_dir,
            dict(qwen3_layout),
            {k: v for k, v in expected.items() if not k.startswith(("visual.", "mlp_AR."))},
            "its LLM",
        ),
    )
    for directory, found, want, part in checks:
        missing, unexpected, mismatched = compare_layout(found, want)
        missing = [k for k in missing if k not in created]
        if missing or unexpected or mismatched:
            what = f"the Keye-VL-1.5 layout of {part} (sizes from its config.json)"
            raise ValueError(layout_error(directory, missing, unexpected, mismatched, what=what))


def init_projector(cfg: ProjectorConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """A fresh projector state (the model's own init_weights), reproducible from `seed`."""
    from keye_train.models.keye import init_weights
    from keye_train.models.projector import Projector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = Projector(cfg)
        init_weights(projector)
    return projector.state_dict()


def text_tower_hf_config(siglip_config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of OUT/siglip_text: the source SigLIP text config as a SiglipTextModel config."""
    text = dict(siglip_config["text_config"])
    text.update(architectures=["SiglipTextModel"], model_type="siglip_text_model")
    return text
