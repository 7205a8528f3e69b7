"""The shard JSON schema of docs/data.md, checked field by field: a bad value names its path and type.

Every check raises ValueError("<path>: <what is wrong>"), e.g. `messages[1].content[0].text: expected a
string, got int 5`, so that a skipped sample says which field to fix. Presence alone is not enough:
an integer where text belongs would otherwise be rendered with str() and trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROLES = ("system", "user", "assistant")
# part type -> the field holding its value
PART_FIELDS = {
    "text": "text",
    "image": "image",
    "video": "video",
    "ref": "text",
    "ocr": "text",
    "point": "point",
    "box": "box",
    "polygon": "polygon",
    "clip_time": "clip_time",
}
GROUNDING_TYPES = ("point", "box", "polygon")


def _type(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def expect_str(value: Any, path: str, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{path}: expected a string, got {_type(value)}")
    if nonempty and not value.strip():
        raise ValueError(f"{path}: is empty")
    return value


def expect_object(value: Any, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: expected an object, got {_type(value)}")
    return value


def _numbers(value: Any, path: str, count: int) -> None:
    if not isinstance(value, list | tuple) or len(value) != count or not all(map(_is_number, value)):
        raise ValueError(f"{path}: expected {count} numbers, got {_type(value)}")


def _one_or_many(value: Any, path: str, depth: int) -> list:
    """A single item (nested `depth` lists of numbers) or a non-empty list of such items."""
    probe = value
    for _ in range(depth):
        if not isinstance(probe, list | tuple) or not probe:
            raise ValueError(f"{path}: expected a list, got {_type(probe)}")
        probe = probe[0]
    return list(value) if isinstance(probe, list | tuple) else [value]


def check_grounding(kind: str, value: Any, path: str) -> None:
    if kind == "point":
        for i, point in enumerate(_one_or_many(value, path, 1)):
            _numbers(point, f"{path}[{i}]", 2)
    elif kind == "box":
        for i, box in enumerate(_one_or_many(value, path, 1)):
            _numbers(box, f"{path}[{i}]", 4)
    else:
        for i, polygon in enumerate(_one_or_many(value, path, 2)):
            if not isinstance(polygon, list | tuple) or len(polygon) < 3:
                raise ValueError(f"{path}[{i}]: a polygon needs at least 3 points, got {_type(polygon)}")
            for j, point in enumerate(polygon):
                _numbers(point, f"{path}[{i}][{j}]", 2)


def check_part(part: Any, path: str) -> None:
    """One content part: a string, or an object with a known `type` and its typed value field."""
    if isinstance(part, str):
        return
    part = expect_object(part, path)
    kind = part.get("type")
    if kind not in PART_FIELDS:
        raise ValueError(f"{path}.type: {kind!r} is not one of {sorted(PART_FIELDS)}")
    name = PART_FIELDS[kind]
    if name not in part:
        raise ValueError(f"{path}.{name}: missing (a {kind!r} part needs it)")
    value = part[name]
    if kind in ("text", "ref", "ocr"):
        expect_str(value, f"{path}.{name}")
    elif kind in ("image", "video"):
        expect_str(value, f"{path}.{name}", nonempty=True)
    elif kind == "clip_time":
        _numbers(value, f"{path}.clip_time", 2)
    else:
        check_grounding(kind, value, f"{path}.{name}")
    if kind in GROUNDING_TYPES:
        if "normalized" in part and not isinstance(part["normalized"], bool):
            raise ValueError(f"{path}.normalized: expected true or false, got {_type(part['normalized'])}")
        index = part.get("image_index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"{path}.image_index: expected an integer >= 0, got {_type(index)}")


def check_content(content: Any, path: str, *, allow_string: bool) -> None:
    if isinstance(content, str) and allow_string:
        return
    if not isinstance(content, list):
        what = "a string or a list of parts" if allow_string else "a list of parts"
        raise ValueError(f"{path}: expected {what}, got {_type(content)}")
    for i, part in enumerate(content):
        check_part(part, f"{path}[{i}]")


def check_messages(doc: Any) -> list:
    """`messages`: a non-empty list of {role: system|user|assistant, content: string | [parts]}."""
    doc = expect_object(doc, "json")
    messages = doc.get("messages")
    if messages is None:
        raise ValueError("json.messages: missing")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"json.messages: expected a non-empty list, got {_type(messages)}")
    for i, message in enumerate(messages):
        where = f"json.messages[{i}]"
        message = expect_object(message, where)
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: {role!r} is not one of {list(ROLES)}")
        check_content(message.get("content", ""), f"{where}.content", allow_string=True)
    return messages


def check_interleaved(doc: Any) -> list:
    """`content`: a non-empty list of parts."""
    doc = expect_object(doc, "json")
    content = doc.get("content")
    if content is None:
        raise ValueError("json.content: missing")
    if not isinstance(content, list) or not content:
        raise ValueError(f"json.content: expected a non-empty list of parts, got {_type(content)}")
    check_content(content, "json.content", allow_string=False)
    return content


def check_caption_meta(meta: Any) -> tuple[str | None, str | None]:
    """The optional caption JSON: an object; question and answer are strings, given together or not."""
    meta = expect_object(meta, "json")
    question, answer = meta.get("question"), meta.get("answer")
    if (question is None) != (answer is None):
        missing = "answer" if answer is None else "question"
        raise ValueError(f"json.{missing}: missing (question and answer go together)")
    if question is not None:
        expect_str(question, "json.question", nonempty=True)
        expect_str(answer, "json.answer", nonempty=True)
    return question, answer
