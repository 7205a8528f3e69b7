"""I/O server wire format and the one decode function shared by servers and local decoding.

A message is a ZeroMQ multipart message: frame 0 is a UTF-8 JSON header, the other frames are raw byte
buffers (media members on requests, tensor storage on replies) described by the header. Nothing received
from the network is unpickled: `pickle.loads` (and `torch.load`, which is pickle underneath) runs whatever
callable the bytes name, so a trainer unpickling replies, or a server unpickling requests on an open TCP
port, would hand code execution to anyone who can reach that port. JSON plus dtype-whitelisted raw
buffers carries the same data, is checked field by field, and lets tensors go out without a copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from keye_train.data.batch import EncodedSample
from keye_train.data.shards.manifest import SOURCE_KINDS, SourceConfig
from keye_train.data.shards.sources import RawRecord, parse_raw

PROTOCOL_VERSION = 1
TENSOR_FIELDS = ("input_ids", "labels", "position_ids", "pixel_values", "grid_thw")
# Only plain numeric dtypes cross the wire; the name is looked up here, never evaluated.
DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
RECORD_FIELDS = ("text", "messages", "content", "question", "answer", "meta")

Frames = list[bytes | memoryview]


class ProtocolError(ValueError):
    """A message that does not follow the wire format (bad JSON, unknown dtype, size mismatch ...)."""


@dataclass(frozen=True)
class Skip:
    """A sample that could not be decoded: reported with its key and reason, never silently dropped."""

    key: str
    source: str
    reason: str


@dataclass(frozen=True)
class DecodeRequest:
    """One sample to decode. Exactly one of: `entry` (a shard index entry; the sample is read from `shard`
    by byte offset, so the server needs the shard at the same path), `raw` (webdataset members
    {name: bytes}, for servers without the shared filesystem) or `record` (an already parsed RawRecord)."""

    source: str
    kind: str
    key: str
    shard: str | None = None
    entry: Any = None
    raw: Mapping[str, bytes] | None = None
    record: RawRecord | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("entry", "raw", "record") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"DecodeRequest {self.key!r}: give exactly one of entry/raw/record, got {given}")
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"DecodeRequest {self.key!r}: kind={self.kind!r} is not one of {SOURCE_KINDS}")
        if self.entry is not None and not self.shard:
            raise ValueError(f"DecodeRequest {self.key!r}: an index entry needs its shard path")


def _reason(exc: BaseException) -> str:
    # The same format as the local pipeline (pipeline.encode_records, sources.iter_records), so a skip
    # reads the same whether a server or the trainer decoded the sample.
    return f"{type(exc).__name__}: {exc}"


def _source_cfg(req: DecodeRequest) -> SourceConfig:
    return SourceConfig(name=req.source, kind=req.kind, shards=[req.shard or "<request>"], weight=1.0)


def read_request_record(req: DecodeRequest) -> RawRecord:
    """The RawRecord a request names (index entries are read by offset through data.index.read_record)."""
    if req.record is not None:
        return req.record
    if req.raw is not None:
        return parse_raw({**req.raw, "__key__": req.key}, source=_source_cfg(req))
    from keye_train.data.shards.index import read_record  # the shard index (imported only where it is used)

    return read_record(req.shard, req.entry, source=_source_cfg(req))


def decode_request(req: DecodeRequest, *, encoder: Any) -> EncodedSample | Skip:
    """Read and encode one sample with `encoder` (a SampleEncoder); bad input becomes a Skip."""
    try:
        rec = read_request_record(req)
        return encoder.encode(rec)
    except Exception as exc:  # any bad input is a skip, exactly as in local decoding
        return Skip(key=req.key, source=req.source, reason=_reason(exc))


def shard_missing(req: DecodeRequest) -> str | None:
    """Why a server cannot read this request's shard (not a bad sample: another host or local may)."""
    if req.entry is None or os.path.isfile(req.shard):
        return None
    return f"shard {req.shard!r} does not exist on I/O server host {socket.gethostname()}"


def encoder_fingerprint(encoder: Any) -> str:
    """Hash of everything that decides an encoding: tokenizer, image/video configs, chat options.

    Clients compare it with their own encoder's so that a server started with other settings is refused
    instead of silently producing different samples.
    """
    parts = {
        "tokenizer": hashlib.sha256(encoder.tok.tokenizer.to_str().encode()).hexdigest(),
        "image": dataclasses.asdict(encoder.image_cfg),
        "video": dataclasses.asdict(encoder.video_cfg),
        "options": dataclasses.asdict(encoder.options),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- headers ---------------------------------------------------------------------------------------


def pack_header(header: Mapping[str, Any]) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, **header}, separators=(",", ":")).encode()


def unpack_header(frame: bytes | memoryview) -> dict[str, Any]:
    try:
        header = json.loads(bytes(frame))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"message header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"message header {str(header)[:200]!r} is not protocol v{PROTOCOL_VERSION}")
    return header


def _field(header: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(name)
    if not isinstance(value, kind):
        raise ProtocolError(f"header field {name!r}={str(value)[:80]!r} must be {kind}")
    return value


# ---- tensors ---------------------------------------------------------------------------------------


def tensor_frame(t: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """(meta, buffer) of a CPU tensor: its contiguous storage viewed as bytes, without a copy."""
    if t.dtype not in _DTYPE_NAMES:
        raise ProtocolError(f"tensor dtype {t.dtype} cannot be sent; allowed: {sorted(DTYPES)}")
    flat = t.detach().cpu().contiguous().reshape(-1)
    # A byte view works for every dtype, bfloat16 included (which numpy cannot represent).
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}, memoryview(data)


def tensor_from_frame(meta: Mapping[str, Any], buf: bytes | memoryview) -> torch.Tensor:
    dtype = DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
    shape = meta.get("shape")
    if dtype is None:
        raise ProtocolError(f"tensor dtype {meta.get('dtype')!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"tensor shape {shape!r} must be a list of non-negative ints")
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if len(buf) != nbytes:
        raise ProtocolError(f"tensor {meta} needs {nbytes} bytes, frame has {len(buf)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # One copy into memory the tensor owns: it must stay valid after ZeroMQ reuses the frame, and be
    # writable (torch.frombuffer over a read-only frame would warn and alias it).
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(shape)


# ---- requests --------------------------------------------------------------------------------------


def _entry_to_json(entry: Any) -> Any:
    if hasattr(entry, "to_json"):  # index.IndexEntry: the same JSON object as its .idx.jsonl line
        return entry.to_json()
    if dataclasses.is_dataclass(entry):
        return dataclasses.asdict(entry)
    if isinstance(entry, Mapping):
        return dict(entry)
    raise ProtocolError(f"index entry of type {type(entry).__name__} cannot be sent; use a dataclass")


def _entry_from_json(data: Any) -> Any:
    from keye_train.data.shards import index

    if not isinstance(data, dict):
        raise ProtocolError(f"index entry {str(data)[:80]!r} must be a JSON object")
    try:
        return index.IndexEntry.from_json(data)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"index entry {str(data)[:200]!r} does not match IndexEntry: {exc}") from None


def encode_request(req: DecodeRequest, *, seq: int, attempt: int) -> Frames:
    """Frames of a decode request; media bytes travel as their own frames, never inside the JSON."""
    header: dict[str, Any] = {
        "op": "decode",
        "id": seq,
        "attempt": attempt,
        "source": req.source,
        "kind": req.kind,
        "key": req.key,
        "shard": req.shard,
    }
    frames: Frames = []
    if req.entry is not None:
        header["form"], header["entry"] = "entry", _entry_to_json(req.entry)
    elif req.raw is not None:
        names = sorted(k for k in req.raw if not k.startswith("__"))
        header["form"], header["members"] = "raw", names
        frames = [req.raw[n] for n in names]
    else:
        rec = req.record
        header["form"] = "record"
        header["record"] = {f: getattr(rec, f) for f in RECORD_FIELDS}
        header["media"] = [[member, kind] for member, kind, _ in rec.media]
        frames = [data for _, _, data in rec.media]
    return [pack_header(header), *frames]


def decode_request_frames(header: Mapping[str, Any], frames: Sequence[bytes]) -> DecodeRequest:
    """The DecodeRequest of a received message (header already unpacked)."""
    common = {
        "source": _field(header, "source", str),
        "kind": _field(header, "kind", str),
        "key": _field(header, "key", str),
        "shard": header.get("shard") if isinstance(header.get("shard"), str) else None,
    }
    form = header.get("form")
    try:
        if form == "entry":
            return DecodeRequest(**common, entry=_entry_from_json(header.get("entry")))
        if form == "raw":
            names = _field(header, "members", list)
            if len(names) != len(frames) or not all(isinstance(n, str) for n in names):
                raise ProtocolError(f"raw request names {len(names)} members but carries {len(frames)}")
            return DecodeRequest(**common, raw={n: bytes(f) for n, f in zip(names, frames)})
        if form == "record":
            fields, media = _field(header, "record", dict), _field(header, "media", list)
            if len(media) != len(frames):
                raise ProtocolError(f"record request lists {len(media)} media but carries {len(frames)}")
            rec = RawRecord(
                key=common["key"],
                source=common["source"],
                kind=common["kind"],
                **{f: fields.get(f) for f in RECORD_FIELDS if f != "meta"},
                meta=fields.get("meta") or {},
                media=[(str(m), str(k), bytes(f)) for (m, k), f in zip(media, frames)],
            )
            return DecodeRequest(**common, record=rec)
    except ValueError as exc:  # DecodeRequest validation: a malformed request, not a bad sample
        raise ProtocolError(str(exc)) from None
    raise ProtocolError(f"unknown request form {form!r}; expected entry, raw or record")


# ---- replies ---------------------------------------------------------------------------------------


def encode_result(result: EncodedSample | Skip, *, seq: int, attempt: int) -> Frames:
    if isinstance(result, Skip):
        header = {"status": "skip", "id": seq, "attempt": attempt, **dataclasses.asdict(result)}
        return [pack_header(header)]
    metas, buffers = [], []
    for name in TENSOR_FIELDS:
        meta, buf = tensor_frame(getattr(result, name))
        metas.append({"name": name, **meta})
        buffers.append(buf)
    header = {
        "status": "ok",
        "id": seq,
        "attempt": attempt,
        "key": result.key,
        "source": result.source,
        "kind": result.kind,
        "tensors": metas,
    }
    return [pack_header(header), *buffers]


def encode_status(*, seq: int | None, attempt: int | None, status: str, message: str = "") -> Frames:
    """A reply without a result: busy (refused at the high-water mark) or error (retry elsewhere)."""
    return [pack_header({"status": status, "id": seq, "attempt": attempt, "message": message})]


def decode_result(header: Mapping[str, Any], frames: Sequence[bytes | memoryview]) -> EncodedSample | Skip:
    """The EncodedSample or Skip of an ok/skip reply."""
    if header.get("status") == "skip":
        return Skip(
            key=_field(header, "key", str), source=_field(header, "source", str), reason=str(header["reason"])
        )
    metas = _field(header, "tensors", list)
    if len(metas) != len(frames) or [m.get("name") for m in metas] != list(TENSOR_FIELDS):
        raise ProtocolError(f"reply tensors {[m.get('name') for m in metas]} != {list(TENSOR_FIELDS)}")
    tensors = {m["name"]: tensor_from_frame(m, f) for m, f in zip(metas, frames)}
    return EncodedSample(
        key=_field(header, "key", str),
        source=_field(header, "source", str),
        kind=_field(header, "kind", str),
        **tensors,
    )
