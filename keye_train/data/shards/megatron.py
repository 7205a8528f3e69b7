"""Megatron-LM indexed text (`.bin`/`.idx`, as its preprocess_data.py writes) as source kind `megatron`.

The manifest lists the `.bin` files (each with its `.idx` beside it). Both are read through
megatron-core's IndexedDataset, which owns the format: one sample is one document (its sequences'
token ids, concatenated, exactly as preprocessed: no end-of-text is added). The sample enters the
loaders like a shard sample:
- the stream loader iterates documents (`iter_raw`);
- the indexed loader plans from a sidecar index in the shard-index format (`build_index`), whose
  entries name each document's byte range in the `.bin` as member `tokens.<dtype>`, so the index API's
  reader (index.read_record) fetches a document by offset like any tar member.
Token ids are checked against the tokenizer: an id outside the vocabulary, or a vision token (which
would need pixels), makes the document a counted skip.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

KIND = "megatron"
MEMBER = "tokens"  # member name: tokens.<numpy dtype name>
_INT_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64")


def prefix_of(bin_path: str | os.PathLike) -> str:
    path = os.fspath(bin_path)
    if not path.endswith(".bin"):
        raise ValueError(f"megatron shard {path!r} must be the .bin file of a .bin/.idx pair")
    prefix = path[: -len(".bin")]
    if not os.path.isfile(prefix + ".idx"):
        raise ValueError(f"megatron shard {path!r} has no {prefix + '.idx'!r} beside it")
    return prefix


def is_megatron_bin(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return path.endswith(".bin") and os.path.isfile(path[: -len(".bin")] + ".idx")


def open_dataset(bin_path: str | os.PathLike) -> Any:
    # Imported here: megatron-core is needed only by runs that name a megatron source.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix_of(bin_path), multimodal=False, mmap=True)


def _documents(ds: Any) -> Iterator[tuple[int, int, int]]:
    """(document number, first sequence, end sequence) of every document."""
    bounds = ds.document_indices
    for doc in range(len(bounds) - 1):
        yield doc, int(bounds[doc]), int(bounds[doc + 1])


def _key(bin_path: str | os.PathLike, doc: int) -> str:
    return f"{Path(bin_path).stem}-{doc:09d}"


def _member(ds: Any) -> str:
    dtype = np.dtype(ds.index.dtype).name
    if dtype not in _INT_DTYPES:
        raise ValueError(f"megatron dataset {ds.path_prefix!r} holds {dtype} values, not token ids")
    return f"{MEMBER}.{dtype}"


def iter_raw(bin_path: str, *, on_error: Callable[[str, str], None]) -> Iterator[dict]:
    """Raw samples {"__key__", "tokens.<dtype>": bytes} of a dataset, one per document."""
    try:
        ds = open_dataset(bin_path)
        member = _member(ds)
    except (ValueError, OSError, AssertionError) as exc:  # megatron-core asserts on a bad header
        on_error(f"<{bin_path}>", f"unreadable megatron dataset: {type(exc).__name__}: {exc}")
        return
    for doc, start, end in _documents(ds):
        tokens = np.concatenate(ds[start:end]) if end > start else np.empty(0, ds.index.dtype)
        yield {"__key__": _key(bin_path, doc), "__url__": bin_path, member: tokens.tobytes()}


def parse_tokens(raw: dict) -> tuple[str, bytes]:
    """The (member, bytes) of a raw megatron sample; ValueError when it has none or several."""
    members = [k for k in raw if k.startswith(MEMBER + ".")]
    if len(members) != 1:
        raise ValueError(f"a megatron sample needs one {MEMBER}.<dtype> member, has {sorted(raw)}")
    dtype = members[0].split(".", 1)[1]
    if dtype not in _INT_DTYPES:
        raise ValueError(f"member {members[0]!r}: {dtype!r} is not an integer dtype {_INT_DTYPES}")
    data = raw[members[0]]
    if len(data) % np.dtype(dtype).itemsize:
        raise ValueError(f"member {members[0]!r}: {len(data)} bytes is not a whole number of {dtype}")
    if len(data) < 2 * np.dtype(dtype).itemsize:
        raise ValueError(f"member {members[0]!r}: a document needs at least 2 tokens to learn from")
    return members[0], data


def token_ids(member: str, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=member.split(".", 1)[1]).astype(np.int64)


def check_ids(ids: np.ndarray, tokenizer: Any) -> None:
    """Every id inside the vocabulary and none a vision token (those need pixels and a grid)."""
    vocab = tokenizer.vocab_size
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise ValueError(
            f"token id {int(bad[0])} is outside the tokenizer vocabulary [0, {vocab}) ({bad.size} such ids); "
            "was the dataset preprocessed with another tokenizer?"
        )
    ids_ = tokenizer.ids
    visual = [ids_.image_pad, ids_.video_pad, ids_.vision_start, ids_.vision_end]
    if np.isin(ids, visual).any():
        raise ValueError("the document holds vision tokens (image/video pad or vision start/end)")


def encode(rec: Any, tokenizer: Any) -> Any:
    """The EncodedSample of a parsed megatron record: the document's ids, every next token a target."""
    import torch

    from keye_train.data.batch import IGNORE_INDEX, EncodedSample
    from keye_train.models.rope import mrope_position_ids

    ((member, _, data),) = rec.media
    ids = token_ids(member, data)
    check_ids(ids, tokenizer)
    input_ids = torch.from_numpy(ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = input_ids[1:]
    return EncodedSample(
        key=rec.key,
        source=rec.source,
        kind=rec.kind,
        input_ids=input_ids,
        labels=labels,
        position_ids=mrope_position_ids(
            input_ids, grids_hw=[], visual_token_ids=tokenizer.ids.visual_pad_ids
        ),
        pixel_values=torch.empty(0, 3, 14, 14),
        grid_thw=torch.empty(0, 3, dtype=torch.long),
    )


def build_index(bin_path: str | os.PathLike, *, tokenizer: Any = None, options: Any = None) -> Path:
    """The sidecar index `<name>.bin.idx.jsonl` in the shard-index format (data/shards/index.py): one
    entry per document, its byte range in the .bin as member `tokens.<dtype>`, its tokens exact."""
    from keye_train.data.shards import index
    from keye_train.data.text import chat

    options = options if options is not None else chat.ChatOptions()
    ds = open_dataset(bin_path)
    member = _member(ds)
    itemsize = np.dtype(ds.index.dtype).itemsize
    entries = []
    for doc, start, end in _documents(ds):
        offset = int(ds.index.sequence_pointers[start]) if end > start else 0
        count = int(ds.index.sequence_lengths[start:end].sum())
        entry = index.IndexEntry(
            key=_key(bin_path, doc),
            kind=KIND,
            offset=offset,
            members={member: [offset, count * itemsize]},
            text_tokens=count,
            text_exact=True,
        )
        try:
            if count < 2:
                raise ValueError(f"a document needs at least 2 tokens to learn from, has {count}")
            if tokenizer is not None:
                check_ids(np.concatenate(ds[start:end]).astype(np.int64), tokenizer)
        except ValueError as exc:
            entry.error = f"ValueError: {exc}"
        entries.append(entry)
    header = index._header(
        Path(bin_path),
        kind=KIND,
        tokenizer=index.tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        chat={"system_prompt": options.system_prompt, "think_mode": options.think_mode},
        samples=len(entries),
        errors=sum(e.error is not None for e in entries),
        tar_error=None,
    )
    out = index.index_path(bin_path)
    tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for entry in entries:
            f.write(json.dumps(entry.to_json()) + "\n")
    os.replace(tmp, out)
    return out
