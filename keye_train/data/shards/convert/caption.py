"""Image + caption pairs -> kind `caption`.

Inputs: JSONL / JSON / TSV / parquet tables of `{<image field>: local path, <caption field>: str}` rows,
and img2dataset output: a `files`-format folder (`00000/000000123.jpg` beside `.txt` and `.json`) or its
`webdataset`-format tar shards (read as they are, the same members).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keye_train.data.shards.convert.common import (
    BAD_JSON,
    BAD_RECORD,
    MISSING_MEDIA,
    UNDECODABLE,
    BadRecord,
    Item,
    Sample,
    check_image,
    iter_table,
    read_image,
    require,
)
from keye_train.data.shards.sources import IMAGE_EXTS

KIND = "caption"
OPTIONS = ("image_field", "caption_field")


def _img2dataset_folder(root: Path) -> Iterator[Item]:
    for image in sorted(p for p in root.rglob("*") if p.suffix.lstrip(".").lower() in IMAGE_EXTS):
        record = {"image": str(image), "caption_file": str(image.with_suffix(".txt"))}
        if image.with_suffix(".json").is_file():
            record["json_file"] = str(image.with_suffix(".json"))
        yield Item(str(image.relative_to(root)), record)


def _img2dataset_tar(path: Path) -> Iterator[Item]:
    from keye_train.data.shards.tarread import iter_local_tar

    errors: list[tuple[str, str]] = []
    for raw in iter_local_tar(path, on_error=lambda key, reason: errors.append((key, reason))):
        yield Item(
            f"{path.name}:{raw['__key__']}", {"members": {k: v for k, v in raw.items() if k[:2] != "__"}}
        )
    for key, reason in errors:
        yield Item(f"{path.name}:{key}", error=reason, reason=UNDECODABLE)


def read(inputs: list[Path], *, options: dict) -> Iterator[Item]:
    for path in inputs:
        if path.is_dir():
            yield from _img2dataset_folder(path)
        elif path.suffix == ".tar":
            yield from _img2dataset_tar(path)
        else:
            yield from iter_table(path)


def _meta(data: bytes | None, where: str) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRecord(BAD_JSON, f"{where}: {exc}") from None
    if not isinstance(meta, dict):
        raise BadRecord(BAD_JSON, f"{where}: expected an object, got {type(meta).__name__}")
    return meta


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(BAD_RECORD, f"{where}: not UTF-8: {exc}") from None


def convert(record: Any, *, media_root: Path, options: dict) -> Sample:
    if isinstance(record, dict) and "members" in record:  # img2dataset webdataset shard
        members = record["members"]
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise BadRecord(
                MISSING_MEDIA, f"no image member (one of {list(IMAGE_EXTS)}) in {sorted(members)}"
            )
        if "txt" not in members:
            raise BadRecord(BAD_RECORD, "txt: missing")
        caption, meta = _utf8(members["txt"], "txt"), _meta(members.get("json"), "json")
        data, ext, _ = check_image(members[ext], f"member {ext!r}")
    elif isinstance(record, dict) and "caption_file" in record:  # img2dataset files folder
        caption_file = Path(record["caption_file"])
        if not caption_file.is_file():
            raise BadRecord(BAD_RECORD, f"caption file {caption_file.name!r}: missing")
        caption = _utf8(caption_file.read_bytes(), caption_file.name)
        json_file = record.get("json_file")
        meta = _meta(Path(json_file).read_bytes() if json_file else None, "json")
        data, ext, _ = read_image(media_root, record["image"])
    else:
        image = require(record, options.get("image_field", "image"), str)
        caption = require(record, options.get("caption_field", "caption"), str)
        meta = {}
        data, ext, _ = read_image(media_root, image)
    if not caption.strip():
        raise BadRecord(BAD_RECORD, "caption: is empty")
    members = {ext: data, "txt": caption.encode()}
    if meta:
        members["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return Sample(kind=KIND, members=members)
