"""Checksums of a checkpoint's files, recorded in its completion marker and verified before it is trusted.

DCP's own metadata says which byte ranges of which files hold each tensor, but nothing about their
contents: flipped bits in a data file load silently (issue 13: the loss went to 6.7e21). Every file of a
checkpoint dir (the `.distcp` data files and `.metadata`) therefore gets a SHA-256 in the marker, written
last; load, resume, export, import and merge re-hash and compare before reading a tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MARKER_FILE = "COMPLETE.json"
CHECKSUM = "sha256"
_CHUNK = 8 << 20
# hashlib releases the GIL on large updates, so a few threads hash several files at disk speed.
_HASH_THREADS = min(8, os.cpu_count() or 1)


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(step_dir: str | Path) -> list[str]:
    """Names of the files a marker covers: everything in the dir except the marker and its temp file."""
    step_dir = Path(step_dir)
    return sorted(
        p.name
        for p in step_dir.iterdir()
        if p.is_file() and p.name != MARKER_FILE and not p.name.startswith(f".{MARKER_FILE}")
    )


def file_checksums(step_dir: str | Path, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """name -> {"size", "sha256"} of the checkpoint's files (all of them when names is None)."""
    step_dir = Path(step_dir)
    names = checkpoint_files(step_dir) if names is None else list(names)
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        digests = list(pool.map(lambda n: file_digest(step_dir / n), names))
    return {
        name: {"size": (step_dir / name).stat().st_size, CHECKSUM: digest}
        for name, digest in zip(names, digests)
    }


def checksum_problem(step_dir: str | Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """Why the files of `step_dir` differ from the marker's record, or None when every one matches."""
    step_dir = Path(step_dir)
    for name, want in sorted(recorded.items()):
        path = step_dir / name
        if not path.is_file():
            return f"corrupt: data file {name} recorded in {MARKER_FILE} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"corrupt: data file {name} has {size} bytes, {MARKER_FILE} recorded {want.get('size')}"
    # Sizes first (cheap); then the contents.
    found = file_checksums(step_dir, recorded)
    for name, want in sorted(recorded.items()):
        if found[name][CHECKSUM] != want.get(CHECKSUM):
            recorded_digest, found_digest = str(want.get(CHECKSUM))[:12], found[name][CHECKSUM][:12]
            return (
                f"corrupt: data file {name} fails its {CHECKSUM} check (recorded {recorded_digest}..., "
                f"found {found_digest}...): its bytes changed after the save"
            )
    return None


def marker_checksums(step_dir: str | Path) -> dict[str, dict[str, Any]] | None:
    """The per-file checksums recorded in the marker, or None when the marker records none."""
    try:
        files = json.loads((Path(step_dir) / MARKER_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


# --------------------------------------------------------------------------- failed writes


def root_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (through causes, contexts and DCP's per-rank CheckpointException)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        failures = getattr(current, "failures", None)  # torch.distributed.checkpoint.CheckpointException
        if isinstance(failures, dict):
            for value in failures.values():
                stack.append(value[0] if isinstance(value, tuple) else value)
        stack.extend([current.__cause__, current.__context__])
    return None
