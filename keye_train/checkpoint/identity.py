"""The run identity file (`run_identity.json`), kept in a run dir and in its checkpoint dir.

What it holds and when it is written is train/run_identity.py's business; here is only the file, so that
the checkpoint code can stamp every checkpoint's meta with the run id of the dir it writes into.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

IDENTITY_FILE = "run_identity.json"


def read_identity(directory: str | Path) -> dict[str, Any] | None:
    """The identity record in `directory`, None when it has none; ValueError when it is unreadable."""
    path = Path(directory) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); restore it or remove it") from None
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise ValueError(f"{path} holds no run_id; restore it or remove it")
    return record


def read_run_id(directory: str | Path) -> str | None:
    """The run id recorded in `directory`, None when there is none (or it is unreadable)."""
    try:
        record = read_identity(directory)
    except ValueError:
        return None
    return None if record is None else record["run_id"]


def write_identity(directory: str | Path, record: dict[str, Any]) -> Path:
    """Writes `record` to directory/run_identity.json atomically (readers see the old or the new one)."""
    path = Path(directory) / IDENTITY_FILE
    temp = path.with_name(f".{IDENTITY_FILE}.tmp-{os.getpid()}")
    try:
        temp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path
