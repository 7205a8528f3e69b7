"""ShareGPT / LLaVA-Video: `{id, video: str, conversations: [{from, value}]}` with one `<video>` (or, as
LLaVA-Video writes it, `<image>`) placeholder -> kind `video` (a video conversation)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keye_train.data.shards.convert import llava
from keye_train.data.shards.convert.common import (
    PLACEHOLDER_MISMATCH,
    BadRecord,
    Item,
    Sample,
    read_video,
    require,
)

KIND = "video"
OPTIONS = ("placeholder",)
PLACEHOLDERS = ("<video>", "<image>")


def read(inputs: list[Path], *, options: dict) -> Iterator[Item]:
    return llava.read(inputs, options=options)


def convert(record: Any, *, media_root: Path, options: dict) -> Sample:
    name = require(record, "video", str)
    placeholder = options.get("placeholder")
    if placeholder is None:  # the first of the usual placeholders the record uses
        text = json.dumps(record.get("conversations"))
        placeholder = next((p for p in PLACEHOLDERS if p in text), PLACEHOLDERS[0])
    messages, count = llava.turns(record, placeholder=placeholder)
    if count != 1:
        raise BadRecord(PLACEHOLDER_MISMATCH, f"{count} {placeholder} placeholders for 1 video {name!r}")
    data, ext = read_video(media_root, name)
    llava.bind(messages, "video", [ext])
    doc = {"messages": messages, "id": record.get("id")}
    return Sample(kind=KIND, members={ext: data, "json": json.dumps(doc, ensure_ascii=False).encode()})
