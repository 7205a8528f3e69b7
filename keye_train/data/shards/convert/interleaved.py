"""OBELICS-style interleaved documents: parquet or JSONL rows with parallel `texts` / `images` lists (at
each position exactly one of the two is set; images are local paths) -> kind `interleaved`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keye_train.data.shards.convert.common import (
    BAD_RECORD,
    PLACEHOLDER_MISMATCH,
    BadRecord,
    Item,
    Sample,
    image_member,
    iter_table,
    read_image,
    require,
)

KIND = "interleaved"
OPTIONS = ("texts_field", "images_field")


def read(inputs: list[Path], *, options: dict) -> Iterator[Item]:
    for path in inputs:
        yield from iter_table(path)


def convert(record: Any, *, media_root: Path, options: dict) -> Sample:
    texts = require(record, options.get("texts_field", "texts"), list)
    images = require(record, options.get("images_field", "images"), list)
    if len(texts) != len(images):
        raise BadRecord(PLACEHOLDER_MISMATCH, f"{len(texts)} texts but {len(images)} image slots")
    sample = Sample(kind=KIND)
    content: list = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise BadRecord(PLACEHOLDER_MISMATCH, f"position {i}: exactly one of texts/images must be set")
        if text is not None:
            if not isinstance(text, str):
                raise BadRecord(BAD_RECORD, f"texts[{i}]: expected str, got {type(text).__name__}")
            content.append({"type": "text", "text": text})
            continue
        if not isinstance(image, str):
            raise BadRecord(BAD_RECORD, f"images[{i}]: expected a path, got {type(image).__name__}")
        data, ext, _ = read_image(media_root, image)
        member = image_member(len(sample.members), ext)
        sample.members[member] = data
        content.append({"type": "image", "image": member})
    if not content:
        raise BadRecord(BAD_RECORD, "texts/images: the document is empty")
    sample.members["json"] = json.dumps({"content": content}, ensure_ascii=False).encode()
    return sample
