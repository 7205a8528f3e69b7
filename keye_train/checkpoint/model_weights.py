"""Model weights alone: loading them for `init_from` (a stage dir, a DCP checkpoint or a Hugging Face dir)
and checking that a checkpoint holds every tensor of a model, at its shape.

The optimizer, schedule and counters are `manager.py`'s (a full resume); this is what a new stage or a
run started from other weights reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from keye_train.checkpoint.dcp import (
    MODEL_KEY,
    ModelStateful,
    as_list,
    quiet_dcp,
    read_dcp_metadata,
    resolve_checkpoint,
)
from keye_train.checkpoint.ranks import _on_rank0, _rank


def check_model_keys(model_state: ModelStateful, saved: dict[str, Any], step_dir: Path) -> None:
    """ValueError naming the checkpoint and the first missing keys if the model asks for absent tensors."""
    prefix = MODEL_KEY + "."
    wanted = model_state.state_dict()
    missing = sorted(k for k in wanted if prefix + k not in saved)
    if missing:
        raise ValueError(
            f"checkpoint {step_dir} lacks {len(missing)} tensors of this model, e.g. {missing[:3]}; "
            "was it saved from a different architecture?"
        )
    # Global shapes (DTensor.shape is the unsharded one), so this holds under any parallel layout.
    mismatched = [
        f"{k} saved {list(saved[prefix + k].size)} vs model {list(t.shape)}"
        for k, t in wanted.items()
        if isinstance(t, torch.Tensor) and tuple(saved[prefix + k].size) != tuple(t.shape)
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint {step_dir} does not fit this model ({len(mismatched)} shape mismatches, e.g. "
            f"{'; '.join(mismatched[:3])}); was it saved from a different architecture?"
        )


def _rank0_print(message: str) -> None:
    if _rank() == 0:
        print(message, flush=True)


def load_model_weights(
    model: nn.Module | Sequence[nn.Module], path: str | Path, *, log: Callable[[str], None] | None = None
) -> Path:
    """Collective. Model weights only (for `init_from`) from a stage dir, a DCP checkpoint or a HF dir.

    Returns the directory actually read. The optimizer, schedule and counters are not touched. Messages
    go to `log`, by default printed by rank 0 only (every rank loads; one says so).
    """
    log = log or _rank0_print
    path = Path(path)
    if (path / "config.json").is_file() and not (path / ".metadata").exists():
        _load_hf_weights(model, path)
        log(f"init_from: loaded Hugging Face weights from {path}")
        return path
    try:
        source = Path(_on_rank0(lambda: str(resolve_checkpoint(path, log=log))))
    except ValueError as err:
        raise ValueError(
            f"init_from={path}: not a Hugging Face dir (config.json + safetensors), a keye_train stage dir "
            f"or a DCP checkpoint ({err})"
        ) from err
    items = {MODEL_KEY: ModelStateful(model)}
    check_model_keys(items[MODEL_KEY], read_dcp_metadata(source).state_dict_metadata, source)
    with quiet_dcp():
        dcp.load(items, checkpoint_id=str(source))
    log(f"init_from: loaded model weights from {source}")
    return source


def _load_hf_weights(model: nn.Module | Sequence[nn.Module], path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from keye_train.checkpoint.hf import load_into_model
    from keye_train.checkpoint.safetensors_io import checkpoint_files, iter_shard

    for chunk in as_list(model):
        if not any(isinstance(p, DTensor) for p in chunk.parameters()):
            load_into_model(chunk, path, strict=len(as_list(model)) == 1)
            continue
        # Sharded (FSDP/TP) chunk: full tensors shard by shard; DSD slices each rank's part out of them.
        options = StateDictOptions(full_state_dict=True, strict=False)
        wanted = set(chunk.state_dict())
        for file in checkpoint_files(path):
            shard = {k: t for k, t in iter_shard(file) if k in wanted}
            set_model_state_dict(chunk, shard, options=options)
