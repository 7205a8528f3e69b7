"""DCP checkpoints: the `meta` item, reading model tensors (whole or streamed), model-only checkpoints.

The checkpoint code is split by responsibility: `layout` (names, marker, validation, finding dirs),
`verify` (checksums, staging dirs), `stateful` (model/optimizer Stateful objects, blobs, RNG), this module
(meta and tensor I/O). The names of `layout` and `stateful` are re-exported here for existing callers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from keye_train.checkpoint.kill_points import kill_point
from keye_train.checkpoint.layout import (  # noqa: F401  (re-exported)
    FINAL_DIR,
    FORMAT_VERSION,
    MARKER_FILE,
    META_KEY,
    METADATA_FILE,
    MODEL_KEY,
    OPTIM_KEY,
    RUN_CHECKPOINTS,
    STEP_DIR,
    SUPPORTED_FORMAT_VERSIONS,
    checkpoint_problem,
    find_latest_complete,
    quiet_dcp,
    read_dcp_metadata,
    resolve_checkpoint,
    step_dirs,
    write_marker,
)
from keye_train.checkpoint.staging import atomic_output_dir
from keye_train.checkpoint.stateful import (  # noqa: F401  (re-exported)
    ModelStateful,
    OptimizerStateful,
    as_list,
    combine_modules,
    pack,
    rng_state,
    set_rng_state,
    unpack,
)
from keye_train.models.configs import (
    KeyeConfig,
    LanguageConfig,
    ProjectorConfig,
    TextTowerConfig,
    VisionConfig,
)


def keye_config_to_dict(cfg: KeyeConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def keye_config_from_dict(data: Mapping[str, Any]) -> KeyeConfig:
    """Inverse of keye_config_to_dict (tolerates missing sub-configs: they take their defaults)."""
    parts = {
        "vision": VisionConfig,
        "projector": ProjectorConfig,
        "language": LanguageConfig,
        "text_tower": TextTowerConfig,
    }
    kwargs: dict[str, Any] = {k: v for k, v in data.items() if k not in parts}
    for name, cls in parts.items():
        if name in data:
            kwargs[name] = cls(**data[name])
    return KeyeConfig(**kwargs)


def make_meta(
    *,
    step: int | None,
    keye_cfg: KeyeConfig | None,
    config_yaml: str = "",
    world_size: int = 1,
    run_id: str | None = None,
) -> dict[str, Any]:
    """The `meta` item of every checkpoint: what export/merge need without loading any tensor, and the id
    of the run that wrote it (train/run_identity.py; None for conversions)."""
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "keye_config": keye_config_to_dict(keye_cfg) if keye_cfg is not None else None,
        "config_yaml": config_yaml,
        "world_size": world_size,
        "run_id": run_id,
    }


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    """The `meta` item (format version, step, KeyeConfig dict, resolved config YAML) of a checkpoint."""
    metadata = read_dcp_metadata(step_dir)
    if META_KEY not in metadata.state_dict_metadata:
        raise ValueError(f"{step_dir} has no '{META_KEY}' item; it was not written by keye_train")
    holder: dict[str, Any] = {META_KEY: b""}
    with quiet_dcp():
        dcp.load(holder, checkpoint_id=str(step_dir), no_dist=True)
    meta = unpack(holder[META_KEY])
    if meta.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"{step_dir}: checkpoint format version {meta.get('format_version')!r} is unknown")
    return meta


def saved_keye_config(step_dir: str | Path) -> KeyeConfig:
    """The KeyeConfig saved in a checkpoint's meta; ValueError if the trainer did not record one."""
    data = read_meta(step_dir).get("keye_config")
    if data is None:
        raise ValueError(
            f"{step_dir} records no KeyeConfig (the trainer should pass TrainState(keye_cfg=...))"
        )
    return keye_config_from_dict(data)


def model_tensor_specs(step_dir: str | Path) -> dict[str, TensorStorageMetadata]:
    """Model key (HF name, without the 'model.' prefix) -> stored size and dtype, in saved order."""
    prefix = MODEL_KEY + "."
    return {
        key[len(prefix) :]: value
        for key, value in read_dcp_metadata(step_dir).state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(value, TensorStorageMetadata)
    }


def read_model_tensors(step_dir: str | Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of the given model keys, read in this process only."""
    specs = model_tensor_specs(step_dir)
    missing = [k for k in keys if k not in specs]
    if missing:
        raise ValueError(f"{step_dir} has no model tensors {missing[:3]}")
    holder = {
        f"{MODEL_KEY}.{k}": torch.empty(tuple(specs[k].size), dtype=specs[k].properties.dtype) for k in keys
    }
    with quiet_dcp():
        dcp.load(holder, checkpoint_id=str(step_dir), no_dist=True)
    return {k: holder[f"{MODEL_KEY}.{k}"] for k in keys}


def iter_model_tensors(
    step_dir: str | Path, *, keys: Sequence[str] | None = None, group_bytes: int = 1 << 30
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, full tensor) of the model, read in groups of about `group_bytes`, so the model never sits
    whole in memory (one DCP read per group keeps the per-call planning overhead small)."""
    specs = model_tensor_specs(step_dir)
    keys = list(specs) if keys is None else list(keys)
    group: list[str] = []
    size = 0
    for key in keys:
        spec = specs[key]
        nbytes = spec.size.numel() * torch.empty((), dtype=spec.properties.dtype).element_size()
        if group and size + nbytes > group_bytes:
            yield from read_model_tensors(step_dir, group).items()
            group, size = [], 0
        group.append(key)
        size += nbytes
    if group:
        yield from read_model_tensors(step_dir, group).items()


def write_model_checkpoint(
    state: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    meta: Mapping[str, Any],
    log: Callable[[str], None] = print,
) -> Path:
    """A model-only DCP checkpoint (single process), complete with marker, appearing atomically at out_dir.

    Used by import and merge: the result loads as `init_from` and as a resume source (model only).
    """
    with atomic_output_dir(out_dir, log=log) as temp, quiet_dcp():
        dcp.save({MODEL_KEY: dict(state), META_KEY: pack(dict(meta))}, checkpoint_id=str(temp), no_dist=True)
        kill_point("dcp.written")
        write_marker(temp, step=meta.get("step"))
    return Path(out_dir).absolute()
