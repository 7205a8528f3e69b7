"""What every converter shares: input items, bad-record reasons, and reading media from the media root."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keye_train.data.shards.sources import IMAGE_EXTS, VIDEO_EXTS

# Every bad record is counted under one of these (docs/data.md, "Converting").
BAD_JSON = "bad_json"  # a line or file that is not valid JSON (or UTF-8), or a row that is not an object
MISSING_MEDIA = "missing_media"  # a referenced image/video file does not exist under the media root
UNDECODABLE = "undecodable"  # the file exists but is not a decodable image/video
PLACEHOLDER_MISMATCH = "placeholder_mismatch"  # <image>/<video> placeholders do not match the media
BAD_RECORD = "bad_record"  # a field is missing or of the wrong type, or the sample breaks the shard schema
REASONS = (BAD_JSON, MISSING_MEDIA, UNDECODABLE, PLACEHOLDER_MISMATCH, BAD_RECORD)


class BadRecord(Exception):
    """A record that cannot be converted; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Item:
    """One input record: `where` locates it for reports (file:line or file:row); `record` is its parsed
    value, or None with `error` set when it could not even be parsed (bad JSON)."""

    where: str
    record: Any = None
    error: str | None = None
    reason: str = BAD_JSON  # the reason `error` is counted under


@dataclass
class Sample:
    """A converted sample: its kind and members (suffix -> bytes), written under a key the writer picks."""

    kind: str
    members: dict[str, bytes] = field(default_factory=dict)


def iter_jsonl(path: Path) -> Iterator[Item]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                yield Item(where, json.loads(line))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield Item(where, error=f"{type(exc).__name__}: {exc}")


def iter_json_or_jsonl(path: Path) -> Iterator[Item]:
    """A JSON list of records, or JSONL (one record per line): LLaVA data comes in both."""
    if path.suffix != ".json":
        yield from iter_jsonl(path)
        return
    try:
        records = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        yield Item(f"{path.name}", error=f"the whole file is not JSON: {type(exc).__name__}: {exc}")
        return
    if not isinstance(records, list):
        yield Item(f"{path.name}", error=f"expected a JSON list of records, got {type(records).__name__}")
        return
    for n, record in enumerate(records):
        yield Item(f"{path.name}[{n}]", record)


def iter_parquet(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for n, row in enumerate(table.to_pylist()):
        yield Item(f"{path.name}:row{n}", row)


def iter_table(path: Path) -> Iterator[Item]:
    """JSONL, JSON, parquet or TSV (with a header line) rows, by file suffix."""
    if path.suffix == ".parquet":
        yield from iter_parquet(path)
    elif path.suffix == ".tsv":
        with open(path, encoding="utf-8", errors="strict") as f:
            header = f.readline().rstrip("\n").split("\t")
            for n, line in enumerate(f, 2):
                cells = line.rstrip("\n").split("\t")
                where = f"{path.name}:{n}"
                if len(cells) != len(header):
                    yield Item(where, error=f"{len(cells)} tab-separated cells, the header has {len(header)}")
                else:
                    yield Item(where, dict(zip(header, cells)))
    else:
        yield from iter_json_or_jsonl(path)


def require(record: Any, name: str, types: type | tuple[type, ...], *, where: str = "") -> Any:
    """record[name], which must exist and be of `types`; else a BadRecord naming the field."""
    if not isinstance(record, dict):
        raise BadRecord(BAD_JSON, f"expected a JSON object, got {type(record).__name__}")
    if record.get(name) is None:
        raise BadRecord(BAD_RECORD, f"{where}{name}: missing")
    value = record[name]
    if not isinstance(value, types) or isinstance(value, bool):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise BadRecord(BAD_RECORD, f"{where}{name}: expected {want}, got {type(value).__name__}")
    return value


def media_path(media_root: Path, name: str) -> Path:
    path = Path(name)
    path = path if path.is_absolute() else media_root / path
    if not path.is_file():
        raise BadRecord(MISSING_MEDIA, f"{os.fspath(path)!r} does not exist")
    return path


_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


def read_image(media_root: Path, name: str) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, member suffix, (width, height)) of an image file, fully decoded once to prove it decodes.
    Formats the shard schema does not list (GIF, TIFF ...) are re-encoded as PNG."""
    return check_image(media_path(media_root, name).read_bytes(), name)


def check_image(data: bytes, name: str) -> tuple[bytes, str, tuple[int, int]]:
    """read_image for bytes in memory (e.g. a member of an img2dataset shard)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()
            size = img.size
            if fmt not in _PIL_EXT:
                buf = io.BytesIO()
                img.convert("RGB").save(buf, "PNG")
                data, fmt = buf.getvalue(), "PNG"
    except Exception as exc:  # PIL raises OSError, SyntaxError, DecompressionBombError ...
        raise BadRecord(UNDECODABLE, f"image {name!r}: {type(exc).__name__}: {exc}") from None
    if size[0] <= 0 or size[1] <= 0:
        raise BadRecord(UNDECODABLE, f"image {name!r} has zero size {size}")
    return data, _PIL_EXT[fmt], size


def read_video(media_root: Path, name: str) -> tuple[bytes, str]:
    """(bytes, member suffix) of a video file whose first frame decodes."""
    import av

    path = media_path(media_root, name)
    ext = path.suffix.lstrip(".").lower()
    if ext not in VIDEO_EXTS:
        raise BadRecord(UNDECODABLE, f"video {name!r}: suffix {ext!r} is not one of {list(VIDEO_EXTS)}")
    data = path.read_bytes()
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            next(container.decode(video=0))
    except (av.error.FFmpegError, ValueError, StopIteration) as exc:
        raise BadRecord(UNDECODABLE, f"video {name!r}: {type(exc).__name__}: {exc}") from None
    return data, ext


def image_member(index: int, ext: str) -> str:
    assert ext in IMAGE_EXTS, ext
    return f"img{index}.{ext}"
