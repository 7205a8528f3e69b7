"""DCP checkpoint dirs: Stateful wrappers, RNG state, marker, validation, finding and streaming them."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _get_fqns,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from keye_train.checkpoint.verify import (
    CHECKSUM,
    checksum_problem,
    file_checksums,
    marker_checksums,
    remove_stale_staging,
)
from keye_train.models.configs import (
    KeyeConfig,
    LanguageConfig,
    ProjectorConfig,
    TextTowerConfig,
    VisionConfig,
)

# Bump when the meaning of the saved keys changes; readers refuse versions they do not know.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
MARKER_FILE = "COMPLETE.json"  # records every file's size and SHA-256 (checkpoint/verify.py)
METADATA_FILE = ".metadata"  # written by DCP's FileSystemWriter when every rank has finished writing
MODEL_KEY = "model"
STEP_DIR = re.compile(r"^step-(\d+)$")
FINAL_DIR = "final"
OPTIM_KEY = "optim"
META_KEY = "meta"
# The optimizer state is keyed by parameter FQN (not by index) so that it reshards with the model.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def pack(obj: Any) -> bytes:
    """Any torch-saveable object -> bytes, so DCP stores it as one opaque item instead of flattening it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def unpack(blob: bytes) -> Any:
    # Our own checkpoint blobs hold plain Python and numpy objects (RNG states), hence weights_only=False.
    return torch.load(io.BytesIO(blob), weights_only=False)


def as_list(items: Any) -> list:
    """None -> [], one object -> [object], a sequence -> list (PP ranks may hold several model chunks)."""
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def combine_modules(*modules: nn.Module) -> nn.Module:
    """One module whose parameter names are those of all `modules` (no prefix), e.g. the Keye model and
    the stage-0 SigLIP text tower trained by one optimizer, checkpointed as one model."""
    combined = nn.Module()
    for module in modules:
        for name, child in module.named_children():
            if hasattr(combined, name):
                raise ValueError(f"combine_modules: two modules both have a child named {name!r}")
            combined.add_module(name, child)
        for name, param in module.named_parameters(recurse=False):
            combined.register_parameter(name, param)
        for name, buffer in module.named_buffers(recurse=False):
            combined.register_buffer(name, buffer)
    return combined


class ModelStateful:
    """DCP Stateful over one or more model chunks; keys are FQNs, values DTensor shards under FSDP/TP."""

    def __init__(self, models: nn.Module | Sequence[nn.Module]) -> None:
        self.models = as_list(models)

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for model in self.models:
            merged.update(get_model_state_dict(model))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for model in self.models:
            set_model_state_dict(model, state_dict, options=StateDictOptions(strict=False))


class OptimizerStateful:
    """DCP Stateful over (model chunk, optimizer) pairs, FQN-keyed so it loads under another layout."""

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        optimizers: torch.optim.Optimizer | Sequence,
        *,
        saved_keys: Collection[str] | None = None,
    ) -> None:
        self.models, self.optimizers = as_list(models), as_list(optimizers)
        # When loading: the DCP keys of the checkpoint. A parameter that never had a gradient (the unused
        # packing position table, say) has no saved state, while DSD gives every fresh parameter one.
        self.saved_keys = saved_keys
        if len(self.models) != len(self.optimizers):
            raise ValueError(
                f"got {len(self.models)} model chunks but {len(self.optimizers)} optimizers; give one "
                "optimizer per model chunk"
            )

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for model, optimizer in zip(self.models, self.optimizers):
            merged.update(get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS))
        self._template = merged
        if self.saved_keys is not None:
            merged = {k: v for k, v in merged.items() if f"{OPTIM_KEY}.{k}" in self.saved_keys}
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Absent entries keep the fresh template values so DSD sees a complete state ...
        full = {**getattr(self, "_template", {}), **state_dict}
        for model, optimizer in zip(self.models, self.optimizers):
            set_optimizer_state_dict(model, optimizer, full, options=_OPTIM_OPTIONS)
            if self.saved_keys is None:
                continue
            # ... and are then dropped: without state the optimizer initialises a parameter lazily on its
            # first gradient, exactly as in the run that saved the checkpoint.
            for name, param in model.named_parameters():
                fqn = next(iter(_get_fqns(model, name)))
                prefix = f"state.{fqn}."
                if param in optimizer.state and not any(k.startswith(prefix) for k in state_dict):
                    del optimizer.state[param]


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes no process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        yield


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
    *, step: int | None, keye_cfg: KeyeConfig | None, config_yaml: str = "", world_size: int = 1
) -> dict[str, Any]:
    """The `meta` item of every checkpoint: what export/merge need without loading any tensor."""
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "keye_config": keye_config_to_dict(keye_cfg) if keye_cfg is not None else None,
        "config_yaml": config_yaml,
        "world_size": world_size,
    }


def write_marker(step_dir: str | Path, *, step: int | None) -> None:
    """Written last, atomically: its presence says every rank's data and the DCP metadata are on disk,
    and its per-file checksums (read back from disk) let every later reader verify them."""
    step_dir = Path(step_dir)
    record = {"format_version": FORMAT_VERSION, "step": step, "files": file_checksums(step_dir)}
    temp = step_dir / f".{MARKER_FILE}.tmp"
    with open(temp, "w") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())  # a marker on disk must never point at data still in the page cache only
    os.replace(temp, step_dir / MARKER_FILE)


def read_dcp_metadata(step_dir: str | Path) -> Metadata:
    """DCP's .metadata of a checkpoint dir; ValueError naming the dir if missing or unreadable."""
    step_dir = Path(step_dir)
    if not (step_dir / METADATA_FILE).is_file():
        raise ValueError(f"{step_dir} has no DCP {METADATA_FILE} file; it is not a (complete) DCP checkpoint")
    try:
        return dcp.FileSystemReader(str(step_dir)).read_metadata()
    except Exception as err:  # pickle and OS errors alike mean the file cannot be trusted
        raise ValueError(
            f"{step_dir}/{METADATA_FILE} is unreadable ({err!r}); the checkpoint is corrupt"
        ) from err


def checkpoint_problem(step_dir: str | Path, *, checksums: bool = True) -> str | None:
    """Why `step_dir` cannot be loaded ('partial: ...' or 'corrupt: ...'), or None when it is complete.

    checksums=True also re-hashes every file against the marker's record (reads the whole checkpoint).
    """
    step_dir = Path(step_dir)
    marker = step_dir / MARKER_FILE
    if not marker.is_file():
        return f"partial: no {MARKER_FILE} (the save did not finish)"
    try:
        version = json.loads(marker.read_text())["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError, OSError) as err:
        return f"corrupt: {MARKER_FILE} is unreadable ({err})"
    if version not in SUPPORTED_FORMAT_VERSIONS:
        known = sorted(SUPPORTED_FORMAT_VERSIONS)
        return f"corrupt: format version {version!r} is unknown (this keye_train reads {known})"
    try:
        metadata = read_dcp_metadata(step_dir)
    except ValueError as err:
        return f"corrupt: {err}"
    # A data file that is missing or shorter than the metadata says means a truncated copy.
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = getattr(info, "offset", 0) + getattr(info, "length", 0)
        name = getattr(info, "relative_path", None)
        if name is not None:
            sizes[name] = max(sizes.get(name, 0), end)
    for name, needed in sizes.items():
        path = step_dir / name
        if not path.is_file() or path.stat().st_size < needed:
            return f"corrupt: data file {name} is missing or truncated"
    recorded = marker_checksums(step_dir)
    if recorded is not None:
        unrecorded = sorted(set(sizes) - set(recorded))
        if unrecorded:
            return f"corrupt: data file {unrecorded[0]} has no {CHECKSUM} in {MARKER_FILE}"
        if checksums:
            return checksum_problem(step_dir, recorded)
    # A marker without checksums was written before they existed: complete, but not verifiable.
    return None


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
    state: Mapping[str, torch.Tensor], out_dir: str | Path, *, meta: Mapping[str, Any]
) -> Path:
    """A model-only DCP checkpoint (single process), complete with marker, appearing atomically at out_dir.

    Used by import and merge: the result loads as `init_from` and as a resume source (model only).
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; remove it or choose another path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    temp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        with quiet_dcp():
            dcp.save(
                {MODEL_KEY: dict(state), META_KEY: pack(dict(meta))}, checkpoint_id=str(temp), no_dist=True
            )
        write_marker(temp, step=meta.get("step"))
        os.replace(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out_dir


def rng_state() -> dict[str, Any]:
    """This rank's generators: torch CPU, CUDA (if present), Python, NumPy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dirs(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` dir, newest first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return sorted(found, reverse=True)


def find_latest_complete(directory: str | Path, *, log: Callable[[str], None] = print) -> Path | None:
    """Newest `step-N` with a valid marker; partial and corrupt ones are skipped with a message."""
    for _, path in step_dirs(directory):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"checkpoint: skipping {path}: {problem}")
    return None


RUN_CHECKPOINTS = "checkpoints"  # where keye-train keeps a run's checkpoints (checkpoint.dir default)


def resolve_checkpoint(path: str | Path, *, log: Callable[[str], None] = print) -> Path:
    """A loadable checkpoint dir: the dir itself, or of a stage dir its `final`, else its newest step.

    A keye-train run directory counts as its `checkpoints/` stage dir, so `init_from=runs/stage2` works.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} does not exist or is not a directory")
    if (path / RUN_CHECKPOINTS).is_dir() and not (path / FINAL_DIR).exists() and not step_dirs(path):
        path = path / RUN_CHECKPOINTS
    if (path / METADATA_FILE).exists() or (path / MARKER_FILE).exists():
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f"checkpoint {path} cannot be loaded: {problem}")
        return path
    final = path / FINAL_DIR
    if final.is_dir():
        problem = checkpoint_problem(final)
        if problem is None:
            return final
        log(f"checkpoint: skipping {final}: {problem}")
    latest = find_latest_complete(path, log=log)
    if latest is None:
        raise ValueError(
            f"{path} is neither a DCP checkpoint nor a stage directory holding a complete `final` or "
            "`step-N` checkpoint"
        )
    return latest
