"""Webdataset readers: raw tar samples of every source kind parsed into records with their media bytes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds

from keye_train.data.shards import megatron, schema
from keye_train.data.shards.manifest import SourceConfig
from keye_train.data.shards.tarread import iter_local_tar

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


@dataclass
class RawRecord:
    """One sample's structure, before any pixel is decoded. media: (member name, "image"|"video", bytes)
    in order of appearance."""

    key: str
    source: str
    kind: str
    text: str | None = None  # caption (caption/video kinds) or the document (text kind)
    messages: list | None = None  # conversation turns (conversation, or video with a conversation)
    content: list | None = None  # interleaved document parts
    question: str | None = None  # optional QA for caption augmentation
    answer: str | None = None
    media: list[tuple[str, str, bytes]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _is_local_tar(url: str) -> bool:
    return url.endswith(".tar") and not url.startswith("pipe:") and "://" not in url


def iter_raw(source: SourceConfig, *, on_error: Callable[[str, str], None] | None = None) -> Iterator[dict]:
    """The raw webdataset samples (dicts of member bytes) of a source, in shard order.

    Unreadable shards and tar members are reported through on_error(key_or_url, reason) and skipped.
    Local uncompressed shards are read by tarread, which reports a cut shard sample by sample; other
    URLs (pipes, object stores, compressed tars) go through webdataset.
    """

    def report(key: str, reason: str) -> None:
        if on_error is not None:
            on_error(key, reason)
        else:
            log.warning("source %s: sample %s skipped: %s", source.name, key, reason)

    def handler(exc: Exception) -> bool:
        report(f"<shard of {source.name}>", f"tar read error: {type(exc).__name__}: {exc}")
        return True

    for url in source.shards:
        if source.kind == megatron.KIND:
            yield from megatron.iter_raw(url, on_error=report)
            continue
        if _is_local_tar(url):
            yield from iter_local_tar(url, on_error=report)
            continue
        dataset = wds.WebDataset(
            url, handler=handler, shardshuffle=False, nodesplitter=None, empty_check=False
        )
        yield from dataset


def _json(raw: Mapping, member: str, key: str) -> Any:
    if member not in raw:
        raise ValueError(f"missing member {member!r}")
    try:
        return json.loads(raw[member])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable JSON in {member!r}: {exc}") from None


def _text(raw: Mapping, member: str) -> str:
    if member not in raw:
        raise ValueError(f"missing member {member!r}")
    try:
        return raw[member].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"member {member!r} is not UTF-8: {exc}") from None


def _first_member(raw: Mapping, exts: tuple[str, ...], what: str) -> str:
    for ext in exts:
        if ext in raw:
            return ext
    raise ValueError(f"missing {what} member (one of {list(exts)}); members: {_members(raw)}")


def _members(raw: Mapping) -> list[str]:
    return sorted(k for k in raw if not k.startswith("__"))


def _referenced_media(parts_lists: list, raw: Mapping) -> list[tuple[str, str, bytes]]:
    """Media members referenced by (already schema-checked) content parts, in order of appearance."""
    media = []
    for parts in parts_lists:
        if isinstance(parts, str):
            continue
        for part in parts:
            if isinstance(part, str) or part.get("type") not in ("image", "video"):
                continue
            member = part[part["type"]]
            if member not in raw:
                raise ValueError(
                    f"{part['type']} part references missing member {member!r}; members: {_members(raw)}"
                )
            media.append((member, part["type"], raw[member]))
    return media


def parse_raw(raw: Mapping, *, source: SourceConfig) -> RawRecord:
    """Parse a raw sample of `source.kind` as docs/data.md defines it; a malformed sample raises
    ValueError naming the member or JSON field at fault."""
    key = str(raw.get("__key__", "?"))
    rec = RawRecord(key=key, source=source.name, kind=source.kind)
    kind = source.kind
    if kind == megatron.KIND:
        member, data = megatron.parse_tokens(raw)
        rec.media = [(member, "tokens", data)]
        return rec
    if kind == "text":
        rec.text = _text(raw, _first_member(raw, ("txt", "text", "md"), "text"))
    elif kind == "caption":
        img = _first_member(raw, IMAGE_EXTS, "image")
        rec.text = _text(raw, "txt")
        rec.meta = dict(schema.expect_object(_json(raw, "json", key), "json")) if "json" in raw else {}
        rec.question, rec.answer = schema.check_caption_meta(rec.meta)
        rec.media = [(img, "image", raw[img])]
    elif kind == "conversation":
        rec.messages = schema.check_messages(_json(raw, "json", key))
        rec.media = _referenced_media([m.get("content", "") for m in rec.messages], raw)
    elif kind == "interleaved":
        rec.content = schema.check_interleaved(_json(raw, "json", key))
        rec.media = _referenced_media([rec.content], raw)
    elif kind == "video":
        doc = _json(raw, "json", key) if "json" in raw else None
        if isinstance(doc, Mapping) and "messages" in doc:
            rec.messages = schema.check_messages(doc)
            rec.media = _referenced_media([m.get("content", "") for m in rec.messages], raw)
            if not any(t == "video" for _, t, _ in rec.media):
                raise ValueError("json.messages: references no video member")
        else:
            if doc is not None:
                schema.expect_object(doc, "json")
            vid = _first_member(raw, VIDEO_EXTS, "video")
            rec.text = _text(raw, "txt")
            rec.media = [(vid, "video", raw[vid])]
    else:  # SourceConfig validates kinds; this guards future additions
        raise ValueError(f"unknown source kind {kind!r}")
    if rec.text is not None and not rec.text.strip():
        raise ValueError("empty text/caption")
    for member, _, data in rec.media:
        if not data:
            raise ValueError(f"member {member!r} is empty (0 bytes)")
    return rec


def iter_records(source: SourceConfig, *, on_error: Callable[[str, str], None]) -> Iterator[RawRecord]:
    """Parsed records of a source; malformed samples go to on_error(key, reason) and are skipped."""
    for raw in iter_raw(source, on_error=on_error):
        try:
            yield parse_raw(raw, source=source)
        except Exception as exc:  # a malformed sample must never stop the reader
            on_error(str(raw.get("__key__", "?")), f"{type(exc).__name__}: {exc}")
