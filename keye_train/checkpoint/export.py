"""DCP checkpoint <-> Keye-VL-1.5 Hugging Face directory, streamed tensor group by tensor group."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from keye_train.checkpoint.dcp import (
    iter_model_tensors,
    make_meta,
    model_tensor_specs,
    read_meta,
    resolve_checkpoint,
    saved_keye_config,
    write_model_checkpoint,
)
from keye_train.checkpoint.hf import (
    TEXT_TOWER_DIR,
    compare_layout,
    expected_keye_layout,
    expected_text_tower_layout,
    layout_error,
    load_keye_config,
    write_keye_hf,
)
from keye_train.checkpoint.hf_bundle import write_bundle
from keye_train.checkpoint.safetensors_io import ShardedWriter, iter_checkpoint, parse_dtype, read_layout
from keye_train.checkpoint.staging import atomic_output_dir
from keye_train.models.configs import TextTowerConfig


def _check_tokenizer_dir(tokenizer_dir: Path) -> Path:
    if not tokenizer_dir.is_dir():
        raise ValueError(f"tokenizer dir {tokenizer_dir} does not exist")
    if not any(
        (tokenizer_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise ValueError(
            f"tokenizer dir {tokenizer_dir} holds no tokenizer.json / tokenizer_config.json / vocab.json"
        )
    return tokenizer_dir


def run_tokenizer_dir(source: Path) -> Path | None:
    """The tokenizer dir the run trained with (data.tokenizer of its resolved config), when it exists."""
    import yaml

    try:
        config = yaml.safe_load(read_meta(source).get("config_yaml") or "") or {}
    except (ValueError, yaml.YAMLError):
        return None
    path = ((config.get("data") or {}) if isinstance(config, dict) else {}).get("tokenizer")
    return Path(path) if path and Path(path).is_dir() else None


def _write_text_tower(
    source: Path, keys: list[str], cfg: TextTowerConfig, out_dir: Path, *, dtype: str | torch.dtype, log
) -> None:
    if set(keys) != set(expected_text_tower_layout(cfg)):
        log(f"export: the text tower in {source} is incomplete; {TEXT_TOWER_DIR}/ is not written")
        return
    writer = ShardedWriter(out_dir, max_shard_bytes=5 * 10**9, dtype=parse_dtype(dtype), label=TEXT_TOWER_DIR)
    for key, tensor in iter_model_tensors(source, keys=keys):
        writer.add(key, tensor)
    writer.close()
    config = {
        "architectures": ["SiglipTextModel"],
        "model_type": "siglip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_positions,
        "projection_size": cfg.projection_size,
        "layer_norm_eps": cfg.layer_norm_eps,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log(f"export: wrote the SigLIP text tower ({len(keys)} tensors) to {TEXT_TOWER_DIR}/")


def export_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype = "bf16",
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 10**9,
    group_bytes: int = 1 << 30,
    log: Callable[[str], None] = print,
) -> Path:
    """A keye_train checkpoint (step dir, `final` dir or stage dir) -> a Keye-VL-1.5 Hugging Face dir.

    config.json comes from the KeyeConfig saved in the checkpoint. Beside the weights go the remote code
    transformers loads with `trust_remote_code=True`, generation / preprocessor configs and the tokenizer
    with our chat template (`tokenizer_dir`, default: the run's data.tokenizer). Tensors are read about
    `group_bytes` at a time and written shard by shard; everything is staged beside `out_dir` and renamed
    into place only when complete, so a failure leaves no `out_dir` at all.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; remove it or choose another path")
    tokenizer = _check_tokenizer_dir(Path(tokenizer_dir)) if tokenizer_dir is not None else None
    source = resolve_checkpoint(ckpt_dir, log=log)
    cfg = saved_keye_config(source)
    if tokenizer is None and (tokenizer := run_tokenizer_dir(source)) is not None:
        log(f"export: using the run's tokenizer {tokenizer}")
    if tokenizer is not None and (cfg.bos_token_id is None or cfg.eos_token_id is None):
        # Checkpoints recorded before bos/eos were part of KeyeConfig: the tokenizer knows them.
        from keye_train.data.text.tokenizer import load_tokenizer

        ids = load_tokenizer(tokenizer).ids
        cfg = dataclasses.replace(cfg, bos_token_id=ids.endoftext, eos_token_id=ids.im_end)
    expected = expected_keye_layout(cfg)
    specs = model_tensor_specs(source)
    # Stage 0 trains the SigLIP text tower beside the model: it goes to siglip_text/, as keye-convert init
    # lays it out, so the export can start another stage 0.
    tower_layout = expected_text_tower_layout(cfg.text_tower)
    tower_keys = [k for k in specs if k in tower_layout and k not in expected]
    extra = [k for k in specs if k not in expected and k not in tower_layout]
    if extra:
        log(f"export: leaving out {len(extra)} tensors outside the Keye-VL-1.5 layout, e.g. {extra[:3]}")
    keys = [k for k in specs if k in expected]
    log(f"export: {source} -> {out_dir} ({len(keys)} tensors, {parse_dtype(dtype)})")
    with atomic_output_dir(out_dir, log=log) as staging:
        write_keye_hf(
            iter_model_tensors(source, keys=keys, group_bytes=group_bytes),
            cfg=cfg,
            directory=staging,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            log=log,
        )
        if tower_keys:
            _write_text_tower(
                source, tower_keys, cfg.text_tower, staging / TEXT_TOWER_DIR, dtype=dtype, log=log
            )
        write_bundle(staging, cfg=cfg, tokenizer_dir=tokenizer, log=log)
    log(f"export: wrote {out_dir}" + (f" with the tokenizer of {tokenizer}" if tokenizer else ""))
    return out_dir


def import_from_hf(hf_dir: str | Path, out_dir: str | Path, *, log: Callable[[str], None] = print) -> Path:
    """A Keye-VL-1.5 Hugging Face dir -> a model-only DCP checkpoint (usable as `init_from` or to resume).

    Tensors keep their stored dtype (loading casts them to the model's). DCP writes one checkpoint from one
    state dict, so the weights are held in memory once (about 17 GB for the 8B model in bf16).
    """
    hf_dir = Path(hf_dir)
    cfg = load_keye_config(hf_dir)
    missing, unexpected, mismatched = compare_layout(read_layout(hf_dir), expected_keye_layout(cfg))
    if missing or unexpected or mismatched:
        raise ValueError(layout_error(hf_dir, missing, unexpected, mismatched))
    if (hf_dir / TEXT_TOWER_DIR).is_dir():
        log(f"import: {hf_dir / TEXT_TOWER_DIR} (SigLIP text tower) is not imported; only the Keye model is")
    state = dict(iter_checkpoint(hf_dir))
    log(f"import: {hf_dir} -> {out_dir} ({len(state)} tensors)")
    write_model_checkpoint(state, out_dir, meta=make_meta(step=None, keye_cfg=cfg), log=log)
    log(f"import: wrote {out_dir}")
    return Path(out_dir)
