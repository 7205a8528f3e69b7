"""LLaVA: `{id, image: str | [str], conversations: [{from: human|gpt|system, value}]}` with `<image>`
placeholders, as JSON (a list) or JSONL -> kind `conversation`."""

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
    iter_json_or_jsonl,
    read_image,
    require,
)

KIND = "conversation"
OPTIONS = ("placeholder",)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read(inputs: list[Path], *, options: dict) -> Iterator[Item]:
    for path in inputs:
        yield from iter_json_or_jsonl(path)


def turns(record: Any, *, placeholder: str) -> tuple[list[dict], int]:
    """ChatML messages with a placeholder part where each placeholder stood (the text around it is kept
    verbatim, newlines included), and the number of placeholders."""
    conversations = require(record, "conversations", list)
    messages, count = [], 0
    for i, turn in enumerate(conversations):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(BAD_RECORD, f"{where}: expected an object, got {type(turn).__name__}")
        speaker = require(turn, "from", str, where=f"{where}.")
        if speaker not in ROLES:
            raise BadRecord(BAD_RECORD, f"{where}.from: {speaker!r} is not one of {sorted(ROLES)}")
        value = require(turn, "value", str, where=f"{where}.")
        pieces = value.split(placeholder)
        content: list = []
        for n, piece in enumerate(pieces):
            if n:
                content.append({"type": "placeholder"})
                count += 1
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": ROLES[speaker], "content": content})
    return messages, count


def bind(messages: list[dict], kind: str, members: list[str]) -> None:
    it = iter(members)
    for message in messages:
        for part in message["content"]:
            if part.get("type") == "placeholder":
                part["type"], part[kind] = kind, next(it)


def convert(record: Any, *, media_root: Path, options: dict) -> Sample:
    placeholder = options.get("placeholder", "<image>")
    messages, count = turns(record, placeholder=placeholder)
    images = record.get("image")
    names = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadRecord(BAD_RECORD, f"image: expected a path or a list of paths, got {images!r}"[:200])
    if count != len(names):
        raise BadRecord(
            PLACEHOLDER_MISMATCH, f"{count} {placeholder} placeholders for {len(names)} images {names}"[:200]
        )
    sample = Sample(kind=KIND)
    members = []
    for n, name in enumerate(names):
        data, ext, _ = read_image(media_root, name)
        members.append(image_member(n, ext))
        sample.members[members[-1]] = data
    bind(messages, "image", members)
    doc = {"messages": messages, "id": record.get("id")}
    sample.members["json"] = json.dumps(doc, ensure_ascii=False).encode()
    return sample
