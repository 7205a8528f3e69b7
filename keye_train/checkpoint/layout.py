"""The on-disk layout of checkpoints: names, the completion marker, validation, finding and resolving dirs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from keye_train.checkpoint.verify import (
    CHECKSUM,
    checksum_problem,
    file_checksums,
    marker_checksums,
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
RUN_CHECKPOINTS = "checkpoints"  # where keye-train keeps a run's checkpoints (checkpoint.dir default)


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes no process group; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        yield


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
