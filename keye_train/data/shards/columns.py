"""The planner's view of a shard index as columns memory-mapped from a sidecar .npy (no per-sample objects).

`<shard>.idx.jsonl` stays the index (one JSON object per sample, readable, what the I/O servers get);
beside it, `<shard>.idx.<fingerprint>.npy` holds per sample the predicted LLM tokens, the predicted
cost, whether the sample is unusable, the byte offset of its JSON line and its key. The fingerprint
covers the index file (size, mtime) and everything the prediction depends on (image/video configs,
cost model, predictor), so a change of any of them writes a new sidecar instead of reusing a stale one.
A loading rank then holds 8 bytes per sample in memory (tokens int32, cost float32) plus the order's
permutation; keys and entries are read from the mapped files when a sample is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from keye_train.data.shards.index import IndexEntry, index_path


def _fingerprint(index: Path, parts: Any) -> str:
    stat = index.stat()
    text = json.dumps([stat.st_size, stat.st_mtime_ns, parts], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build(index: Path, predict: Callable[[IndexEntry], tuple[int, float, bool]]) -> np.ndarray:
    rows, keys = [], []
    with open(index, "rb") as f:
        f.readline()  # the header
        offset = f.tell()
        for line in iter(f.readline, b""):
            entry = IndexEntry.from_json(json.loads(line))
            tokens, cost, error = predict(entry)
            rows.append((tokens, cost, error, offset))
            keys.append(entry.key.encode())
            offset = f.tell()
    width = max((len(k) for k in keys), default=1)
    out = np.zeros(
        len(rows),
        dtype=[("tokens", "<i4"), ("cost", "<f4"), ("error", "?"), ("line", "<i8"), ("key", f"S{width}")],
    )
    if rows:
        tokens, cost, error, line = zip(*rows)
        out["tokens"], out["cost"], out["error"], out["line"] = tokens, cost, error, line
        out["key"] = keys
    return out


def load_columns(
    shard: str | os.PathLike, *, parts: Any, predict: Callable[[IndexEntry], tuple[int, float, bool]]
) -> np.ndarray:
    """The shard's columns (a read-only memory map), built from its index on first use for `parts`."""
    index = index_path(shard)
    if not index.is_file():
        raise ValueError(f"index {str(index)!r} does not exist; run `keye-data index {os.fspath(shard)}`")
    path = Path(f"{os.fspath(shard)}.idx.{_fingerprint(index, parts)}.npy")
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.npy")
        try:
            np.save(tmp, _build(index, predict))
            os.replace(tmp, path)  # several loading ranks may build it at once: the same bytes win
        finally:
            tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


class LazyEntries:
    """IndexEntries of a source's shards, flat over the shards, read from the index files on access."""

    def __init__(self, shards: list[str], columns: list[np.ndarray], shard_start: np.ndarray) -> None:
        self.shards, self.columns, self.shard_start = shards, columns, shard_start
        self._fds: dict[int, int] = {}  # index files kept open: one open per shard, not per sample

    def __len__(self) -> int:
        return int(self.shard_start[-1])

    def _locate(self, flat: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.shard_start, flat, side="right")) - 1
        return shard, flat - int(self.shard_start[shard])

    def key(self, flat: int) -> str:
        shard, row = self._locate(flat)
        return self.columns[shard]["key"][row].decode()

    def __getitem__(self, flat: int) -> IndexEntry:
        shard, row = self._locate(int(flat))
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(index_path(self.shards[shard]), os.O_RDONLY)
        lines = self.columns[shard]["line"]
        start = int(lines[row])
        end = int(lines[row + 1]) if row + 1 < len(lines) else os.fstat(fd).st_size
        # pread: no shared file position, so the loader thread and any other reader never interfere
        return IndexEntry.from_json(json.loads(os.pread(fd, end - start, start)))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()
