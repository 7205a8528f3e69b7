"""Local tar shards read sample by sample, so that a cut shard loses only what the cut removed.

webdataset's reader ends a shard at the first read error and still hands on the sample it was in the
middle of (missing the members after the cut), and it says nothing of the samples that were behind the
cut. This reader groups members exactly as webdataset does (same key split and lower-cased suffixes),
yields every complete sample before the cut, reports the sample the cut went through by key, and, when
the shard's sidecar index lists them, every sample behind the cut by key too.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from webdataset.tariterators import base_plus_ext

_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset skips these member names
INDEX_SUFFIX = ".idx.jsonl"  # the shard index sidecar (data/shards/index.py)
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


def _has_end_marker(path: Path) -> bool:
    """Every tar writer ends the archive with two zero blocks; a file cut at a member boundary lacks them."""
    size = path.stat().st_size
    if size < _END_OF_ARCHIVE or size % tarfile.BLOCKSIZE:
        return False
    with open(path, "rb") as f:
        f.seek(size - _END_OF_ARCHIVE)
        return not any(f.read(_END_OF_ARCHIVE))


def indexed_members(path: Path) -> dict[str, set[str]] | None:
    """key -> member suffixes, as the shard's sidecar index lists them (even a stale index: the shard
    may have been cut after it was indexed), or None when there is no readable index."""
    sidecar = Path(os.fspath(path) + INDEX_SUFFIX)
    if not sidecar.is_file():
        return None
    listed: dict[str, set[str]] = {}
    try:
        with open(sidecar) as f:
            next(f, None)  # header
            for line in f:
                entry = json.loads(line)
                if isinstance(entry.get("key"), str):
                    listed[entry["key"]] = set(entry.get("members") or ())
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return listed or None


def iter_local_tar(path: str | os.PathLike, *, on_error: Callable[[str, str], None]) -> Iterator[dict]:
    """webdataset-style samples ({"__key__", "__url__", suffix: bytes}) of an uncompressed local tar."""
    path = Path(path)
    url = os.fspath(path)
    current: dict | None = None
    reading: str | None = None  # key of the member being read when the shard broke off
    done: set[str] = set()
    cut: str | None = None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isreg() or _META_NAME.match(info.name):
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None:
                    continue
                reading = prefix
                member = tar.extractfile(info)
                data = member.read() if member is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name!r} has {len(data)} of {info.size} bytes")
                reading = None
                tar.members = []  # stream mode: do not keep every TarInfo of a large shard
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        done.add(current["__key__"])
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                suffix = suffix.lower()
                if suffix in current:
                    on_error(prefix, f"duplicate member {info.name!r} ignored (the first is kept)")
                    continue
                current[suffix] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        cut = f"{type(exc).__name__}: {exc}"
    if cut is None and not _has_end_marker(path):
        cut = "the file ends without the tar end-of-archive blocks"
    if cut is None:
        if current is not None:
            yield current
        return
    where = f"shard {url!r} is cut or damaged ({cut})"
    listed = indexed_members(path)
    if current is not None:
        key = current["__key__"]
        members = {k for k in current if not k.startswith("__")}
        # The last sample read is complete when the cut went through another sample's member, or (at a
        # header) when the index says it has no more members; without an index the schema check decides.
        complete = reading not in (None, key) or (
            reading is None and (listed is None or listed.get(key, members) <= members)
        )
        if complete:
            done.add(key)
            yield current
        else:
            on_error(key, f"truncated shard: sample cut by the end of {where}; read {sorted(members)}")
            done.add(key)
    if reading is not None and reading not in done:
        on_error(reading, f"truncated shard: sample cut by the end of {where}")
        done.add(reading)
    if listed is None:
        on_error(
            f"<{url}>", f"truncated shard: {where}; samples behind the cut are lost (no index names them)"
        )
        return
    for key in listed:
        if key not in done:
            on_error(key, f"truncated shard: sample behind the cut of {where}")
