"""Shard index: per-sample offsets, media sizes and text tokens read from tar headers, without decoding."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from keye_train.data import batch as layout
from keye_train.data.media.video_decode import video_stream_header
from keye_train.data.shards.manifest import SOURCE_KINDS, SourceConfig
from keye_train.data.shards.sources import IMAGE_EXTS, VIDEO_EXTS, RawRecord, parse_raw
from keye_train.data.text import chat
from keye_train.data.text.tokenizer import SPECIAL_TOKENS, LoadedTokenizer, load_tokenizer

log = logging.getLogger(__name__)

INDEX_FORMAT = "keye-shard-index"
INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.jsonl"
# webdataset's tar_file_iterator skips these member names (metadata), so the index does too
_META_NAME = re.compile(r"__[^/]*__($|/)")
_SPECIALS = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
# A video is rendered with one frame of this timestamp and an empty grid; its text is subtracted again.
_PROBE_FRAME = layout.FrameSpec(index=0, timestamp=0.0, is_fast=False, grid_hw=(0, 0))
_PROBE_TIMESTAMP = f"{_PROBE_FRAME.timestamp:.1f}"


@dataclass
class IndexEntry:
    """One sample of a shard as the index records it (no pixels).

    text_tokens counts every LLM token of the rendered sample except the visual ones: image/video pad
    tokens and, per video frame, the `<|frame|>` marker, its timestamp and the fast-frame markers (those
    depend on the image/video configs and are added by `predict_tokens`). It is exact for the tokenizer
    and chat options the index was built with (`text_exact`), else an estimate (4 bytes per token).
    """

    key: str
    kind: str
    offset: int  # byte offset of the sample's first tar member header
    members: dict[str, list[int]]  # webdataset field name (e.g. "jpg", "img0.png") -> [data offset, size]
    images: list[list[int]] = field(default_factory=list)  # [width, height] per image, in order
    videos: list[dict] = field(default_factory=list)  # {duration, fps, width, height, frames} per video
    text_tokens: int = 0
    text_exact: bool = False
    error: str | None = None  # why the encoder would refuse the sample; the planner skips it with this
    warnings: list[str] = field(default_factory=list)

    @property
    def video(self) -> dict | None:
        """The sample's first (in every synthetic and most real data: only) video, or None."""
        return self.videos[0] if self.videos else None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> IndexEntry:
        return cls(**data)


def index_path(shard_path: str | os.PathLike) -> Path:
    """The sidecar index file of a shard: `<shard>.idx.jsonl`."""
    return Path(os.fspath(shard_path) + INDEX_SUFFIX)


def tokenizer_fingerprint(tok: LoadedTokenizer) -> str:
    """A short hash of the tokenizer's full definition, so an index built with another one is stale."""
    return hashlib.sha256(tok.tokenizer.to_str().encode()).hexdigest()[:16]


def infer_kind(raw: dict) -> str:
    """The source kind a sample's members imply (used when the shard's kind is not given)."""
    if any(ext in raw for ext in VIDEO_EXTS):
        return "video"
    if "json" in raw:
        try:
            doc = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable JSON in 'json' (cannot infer the kind): {exc}") from None
        if isinstance(doc, dict) and "messages" in doc:
            return "conversation"
        if isinstance(doc, dict) and "content" in doc:
            return "interleaved"
    if any(ext in raw for ext in IMAGE_EXTS):
        return "caption"
    if any(ext in raw for ext in ("txt", "text", "md")):
        return "text"
    raise ValueError(f"cannot infer the sample kind from members {sorted(k for k in raw if k[:2] != '__')}")


def _image_size(data: bytes, member: str) -> list[int]:
    from PIL import Image

    try:  # Image.open parses the header only; pixels stay undecoded until load()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, SyntaxError ...)
        raise ValueError(f"image {member!r} header unreadable: {type(exc).__name__}: {exc}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"image {member!r} has zero size {width}x{height}")
    return [width, height]


def _video_meta(data: bytes, member: str) -> dict:
    """Container metadata as the PyAV decoder reads it (same frame count and rate), without decoding."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream, fps, frames = video_stream_header(container, repr(member))
            if frames <= 0:  # not recorded by some containers: count packets (demuxing, not decoding)
                frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            if frames <= 0:
                raise ValueError(f"video {member!r} has no frames")
            width, height = stream.codec_context.width, stream.codec_context.height
            duration = float(stream.duration * stream.time_base) if stream.duration else frames / fps
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot open video {member!r}: {exc}; corrupt, truncated or not a video") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"video {member!r} has an empty size {width}x{height}")
    return {"duration": duration, "fps": fps, "width": width, "height": height, "frames": frames}


def _rendered_text(rec: RawRecord, images: list, videos: list, options: chat.ChatOptions) -> list[str]:
    from keye_train.data.loader.encode import SampleEncoder

    # SampleEncoder.render is the encoder's own template code; using it keeps the count in step with
    # it. Rendering needs no tokenizer, hence None.
    encoder = SampleEncoder(None, options=options)  # type: ignore[arg-type]
    infos = [chat.ImageInfo(grid_hw=(0, 0), size=tuple(wh)) for wh in images]
    probes = [chat.VideoInfo(frames=(_PROBE_FRAME,)) for _ in videos]
    return [s.text for s in encoder.render(rec, infos, probes)]


def count_text_tokens(
    rec: RawRecord,
    *,
    images: list,
    videos: list,
    tokenizer: LoadedTokenizer | None,
    options: chat.ChatOptions,
) -> int:
    """Non-visual LLM tokens of a parsed record (see IndexEntry.text_tokens)."""
    texts = _rendered_text(rec, images, videos, options)
    if tokenizer is not None:
        # segments are tokenised one by one, as chat.encode_segments does
        total = sum(len(ids) for ids in tokenizer.encode_batch(texts))
        return total - len(videos) * (1 + len(tokenizer.encode(_PROBE_TIMESTAMP)))
    text = "".join(texts).replace(layout.FRAME + _PROBE_TIMESTAMP, "", len(videos))
    specials = len(_SPECIALS.findall(text))
    return specials + -(-len(_SPECIALS.sub("", text).encode()) // 4)


def _group_members(tar: tarfile.TarFile, groups: list[tuple[str, int, dict, list[str]]]) -> None:
    """Append (key, header offset, {field: [data offset, size]}, warnings) per sample, grouped as
    webdataset's group_by_keys groups them (same key split, lower-cased suffixes, first duplicate kept)."""
    for info in tar:
        if not info.isreg() or _META_NAME.match(info.name):
            continue
        if "/" not in info.name and info.name.startswith("__") and info.name.endswith("__"):
            continue
        prefix, suffix = base_plus_ext(info.name)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if not groups or groups[-1][0] != prefix:
            groups.append((prefix, info.offset, {}, []))
        members, warnings = groups[-1][2], groups[-1][3]
        if suffix in members:
            warnings.append(f"duplicate member {info.name!r} ignored (the tar reader keeps the first)")
            continue
        members[suffix] = [info.offset_data, info.size]


def _read_members(f: Any, members: dict[str, list[int]]) -> dict[str, bytes]:
    raw = {}
    for name, (offset, size) in members.items():
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"member {name!r} truncated: {len(data)} of {size} bytes in the shard")
        raw[name] = data
    return raw


def _index_sample(
    key: str, raw: dict, *, kind: str | None, tokenizer: LoadedTokenizer | None, options: chat.ChatOptions
) -> tuple[str, list, list, int]:
    """(kind, image sizes, video metadata, text tokens); ValueError says why the sample is unusable."""
    kind = kind or infer_kind(raw)
    rec = parse_raw(
        {"__key__": key, **raw}, source=SourceConfig(name="index", kind=kind, shards=["-"], weight=1)
    )
    images = [_image_size(data, member) for member, what, data in rec.media if what == "image"]
    videos = [_video_meta(data, member) for member, what, data in rec.media if what == "video"]
    tokens = count_text_tokens(rec, images=images, videos=videos, tokenizer=tokenizer, options=options)
    return kind, images, videos, tokens


def _header(shard: Path, **fields: Any) -> dict:
    stat = shard.stat()
    head = {"index_format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": shard.name}
    return head | {"shard_size": stat.st_size, "shard_mtime_ns": stat.st_mtime_ns} | fields


def _as_tokenizer(tokenizer: LoadedTokenizer | str | os.PathLike | None) -> LoadedTokenizer | None:
    if tokenizer is None or isinstance(tokenizer, LoadedTokenizer):
        return tokenizer
    return load_tokenizer(tokenizer)


def build_index(
    shard_path: str | os.PathLike,
    *,
    tokenizer: LoadedTokenizer | str | os.PathLike | None = None,
    kind: str | None = None,
    options: chat.ChatOptions | None = None,
) -> Path:
    """Index one uncompressed tar shard into `<shard>.idx.jsonl` (written atomically); returns its path.

    kind: the source kind of the shard (None: inferred per sample from its members). A sample the
    encoder would refuse gets `error` (and is still listed, so the planner can skip it with the reason);
    an unreadable tail of the shard is recorded in the header's `tar_error`.
    """
    shard = Path(shard_path)
    # --- hook (issue 12): Megatron .bin/.idx datasets are indexed by data/shards/megatron.py ---
    from keye_train.data.shards import megatron

    if kind == megatron.KIND or (kind is None and megatron.is_megatron_bin(shard)):
        return megatron.build_index(shard, tokenizer=_as_tokenizer(tokenizer), options=options)
    # --- end hook ---
    if kind is not None and kind not in SOURCE_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {SOURCE_KINDS}")
    if not shard.is_file():
        raise ValueError(f"shard {str(shard)!r} does not exist or is not a file")
    tok = _as_tokenizer(tokenizer)
    options = options if options is not None else chat.ChatOptions()
    tar_error = None
    groups: list[tuple[str, int, dict, list[str]]] = []
    with open(shard, "rb") as f:
        try:
            # "r:" (no compression): member offsets are only meaningful in an uncompressed tar
            tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed below; open errors differ
        except tarfile.TarError as exc:
            raise ValueError(
                f"{str(shard)!r} is not an uncompressed tar (index needs offsets): {exc}"
            ) from None
        with tar:
            try:
                _group_members(tar, groups)
            except tarfile.TarError as exc:  # a damaged tail: keep what was read, as the tar reader does
                tar_error = f"{type(exc).__name__}: {exc}"
                log.warning("shard %s: tar unreadable after %d samples: %s", shard, len(groups), exc)
        entries = []
        for key, offset, members, warnings in groups:
            entry = IndexEntry(key=key, kind=kind or "?", offset=offset, members=members, warnings=warnings)
            entry.text_exact = tok is not None
            try:
                raw = _read_members(f, members)
                entry.kind, entry.images, entry.videos, entry.text_tokens = _index_sample(
                    key, raw, kind=kind, tokenizer=tok, options=options
                )
            except Exception as exc:  # one bad sample must never stop indexing
                entry.error = f"{type(exc).__name__}: {exc}"
            entries.append(entry)
    header = _header(
        shard,
        kind=kind,
        tokenizer=tokenizer_fingerprint(tok) if tok is not None else None,
        chat={"system_prompt": options.system_prompt, "think_mode": options.think_mode},
        samples=len(entries),
        errors=sum(e.error is not None for e in entries),
        tar_error=tar_error,
    )
    out = index_path(shard)
    tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as w:
            w.write(json.dumps(header) + "\n")
            for entry in entries:
                w.write(json.dumps(entry.to_json()) + "\n")
        os.replace(tmp, out)  # readers see the old index or the complete new one, never a partial file
    except OSError as err:
        if err.errno and err.filename is None:  # a failed write() names no file
            raise OSError(err.errno, err.strerror, str(out)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return out


def stale_reason(
    shard_path: str | os.PathLike,
    header: dict,
    *,
    tokenizer: LoadedTokenizer | None = None,
    kind: str | None = None,
    options: chat.ChatOptions | None = None,
) -> str | None:
    """Why an index header does not describe the shard (and requested settings), or None if it does."""
    if header.get("index_format") != INDEX_FORMAT or header.get("version") != INDEX_VERSION:
        return f"format {header.get('index_format')!r} v{header.get('version')}, expected v{INDEX_VERSION}"
    current = _header(Path(shard_path))
    for name in ("shard_size", "shard_mtime_ns"):
        if header.get(name) != current[name]:
            return f"the shard changed ({name} {header.get(name)} in the index, {current[name]} now)"
    if tokenizer is not None and header.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        return f"built with tokenizer {header.get('tokenizer')}, not {tokenizer_fingerprint(tokenizer)}"
    if kind is not None and header.get("kind") != kind:
        return f"built for kind {header.get('kind')!r}, not {kind!r}"
    if options is not None:
        wanted = {"system_prompt": options.system_prompt, "think_mode": options.think_mode}
        if header.get("chat") != wanted:
            return f"built with chat options {header.get('chat')}, not {wanted}"
    return None


def load_index(
    shard_path: str | os.PathLike,
    *,
    rebuild: bool = False,
    tokenizer: LoadedTokenizer | str | os.PathLike | None = None,
    kind: str | None = None,
    options: chat.ChatOptions | None = None,
) -> list[IndexEntry]:
    """The entries of a shard's index. A missing or stale index (shard changed, other format version,
    or other tokenizer/kind/chat options than given) is rebuilt with rebuild=True, else refused."""
    tok = _as_tokenizer(tokenizer)
    path = index_path(shard_path)
    reason = "it does not exist"
    if path.is_file():
        with open(path) as f:
            lines = f.read().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        reason = stale_reason(shard_path, header, tokenizer=tok, kind=kind, options=options)
        if reason is None:
            return [IndexEntry.from_json(json.loads(line)) for line in lines[1:]]
    if not rebuild:
        raise ValueError(
            f"index {str(path)!r} is not usable: {reason}; run `keye-data index {os.fspath(shard_path)}` "
            "(with the run's --tokenizer) or load with rebuild=True"
        )
    log.info("rebuilding index %s: %s", path, reason)
    build_index(shard_path, tokenizer=tok, kind=kind, options=options)
    return load_index(shard_path, tokenizer=tok, kind=kind, options=options)


def read_record(
    shard_path: str | os.PathLike, entry: IndexEntry, *, source: SourceConfig, fileobj: Any = None
) -> RawRecord:
    """Seek to and read only this sample's members, and parse them as the streaming tar reader does.

    fileobj: an open binary handle of the shard to reuse (else the shard is opened for this call).
    """
    if fileobj is not None:
        raw = _read_members(fileobj, entry.members)
    else:
        with open(shard_path, "rb") as f:
            raw = _read_members(f, entry.members)
    return parse_raw({"__key__": entry.key, **raw}, source=source)


# Prediction lives beside the index (its own file for size); importable from here as the interface says.
from keye_train.data.shards.predict import VIDEO_SPLITS, image_patches, predict_tokens, video_tokens  # noqa: E402

__all__ = [
    "INDEX_SUFFIX",
    "INDEX_VERSION",
    "VIDEO_SPLITS",
    "IndexEntry",
    "build_index",
    "image_patches",
    "index_path",
    "load_index",
    "predict_tokens",
    "read_record",
    "stale_reason",
    "video_tokens",
]
