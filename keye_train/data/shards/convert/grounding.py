"""RefCOCO-style referring expressions: `{id, image: path, bbox: [x, y, w, h] pixels (COCO), sentences:
[str | {"sent": str}]}` (or `expression: str`) -> kind `conversation`, one question/answer turn per
sentence, the box written normalised to [0, 1000] in the paper's Table-1 notation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keye_train.data.shards.convert.common import (
    BAD_RECORD,
    BadRecord,
    Item,
    Sample,
    image_member,
    iter_table,
    read_image,
    require,
)
from keye_train.data.text.grounding import normalize_coord

KIND = "conversation"
OPTIONS = ("box_format", "question")
BOX_FORMATS = ("xywh", "xyxy")
QUESTION = "Locate the object described in the image: "


def read(inputs: list[Path], *, options: dict) -> Iterator[Item]:
    for path in inputs:
        yield from iter_table(path)


def _sentences(record: dict) -> list[str]:
    if record.get("expression") is not None:
        return [require(record, "expression", str)]
    sentences = require(record, "sentences", list)
    out = []
    for i, s in enumerate(sentences):
        text = s.get("sent") if isinstance(s, dict) else s
        if not isinstance(text, str) or not text.strip():
            raise BadRecord(BAD_RECORD, f"sentences[{i}]: expected a non-empty string or {{sent: str}}")
        out.append(text)
    if not out:
        raise BadRecord(BAD_RECORD, "sentences: is empty")
    return out


def pixel_box(record: dict, box_format: str) -> list[float]:
    bbox = require(record, "bbox", list)
    if len(bbox) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
        raise BadRecord(BAD_RECORD, f"bbox: expected 4 numbers, got {bbox!r}"[:120])
    x1, y1, a, b = (float(v) for v in bbox)
    x2, y2 = (x1 + a, y1 + b) if box_format == "xywh" else (a, b)
    if not (x2 > x1 and y2 > y1):
        raise BadRecord(BAD_RECORD, f"bbox: {bbox} ({box_format}) is empty")
    return [x1, y1, x2, y2]


def convert(record: Any, *, media_root: Path, options: dict) -> Sample:
    box_format = options.get("box_format", "xywh")
    if box_format not in BOX_FORMATS:
        raise ValueError(f"grounding box_format={box_format!r} must be one of {BOX_FORMATS}")
    image = require(record, "image", str)
    x1, y1, x2, y2 = pixel_box(record, box_format)
    sentences = _sentences(record)
    data, ext, (width, height) = read_image(media_root, image)
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise BadRecord(BAD_RECORD, f"bbox: [{x1}, {y1}, {x2}, {y2}] lies outside the {width}x{height} image")
    box = [normalize_coord(x1, width), normalize_coord(y1, height)]
    box += [normalize_coord(x2, width), normalize_coord(y2, height)]
    member = image_member(0, ext)
    question = options.get("question", QUESTION)
    messages = []
    for n, sentence in enumerate(sentences):
        user: list = [{"type": "image", "image": member}] if n == 0 else []
        user.append({"type": "text", "text": question + sentence})
        answer = [{"type": "ref", "text": sentence}, {"type": "box", "box": box, "normalized": True}]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    doc = {"messages": messages, "id": record.get("id")}
    return Sample(kind=KIND, members={member: data, "json": json.dumps(doc, ensure_ascii=False).encode()})
