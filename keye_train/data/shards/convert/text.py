"""Plain text JSONL: one `{<text field>: str, ...}` per line -> kind `text`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keye_train.data.shards.convert.common import BAD_RECORD, BadRecord, Item, Sample, iter_jsonl, require

KIND = "text"
OPTIONS = ("text_field",)


def read(inputs: list[Path], *, options: dict) -> Iterator[Item]:
    for path in inputs:
        yield from iter_jsonl(path)


def convert(record: Any, *, media_root: Path, options: dict) -> Sample:
    text = require(record, options.get("text_field", "text"), str)
    if not text.strip():
        raise BadRecord(BAD_RECORD, "text: is empty")
    return Sample(kind=KIND, members={"txt": text.encode()})
