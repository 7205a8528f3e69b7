"""Decode a replica's planned samples (in process, in workers or on I/O servers); pack them as planned."""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import IO, Any

from keye_train.data.batch import EncodedSample, PackedBatch
from keye_train.data.ioserver.protocol import DecodeRequest, Skip, decode_request
from keye_train.data.loader.encode import SampleEncoder, SkipCounter
from keye_train.data.loader.packing import build_batch, truncate_text
from keye_train.data.shards.manifest import SourceConfig

log = logging.getLogger(__name__)


class ShardFiles:
    """Open shard files of one process, kept and reused (least recently used closed beyond `limit`):
    a planned step reads many samples of each shard by offset, and opening the shard per sample costs a
    syscall round trip and, on network filesystems, a metadata lookup each time."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.opens = 0  # shards opened so far (a reopen after eviction counts again)
        self._files: OrderedDict[str, IO[bytes]] = OrderedDict()

    def get(self, path: str) -> IO[bytes]:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 - kept open, closed by close()
            self.opens += 1
            while len(self._files) > self.limit:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(path)
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def decode_local(req: DecodeRequest, *, encoder: SampleEncoder, files: ShardFiles) -> EncodedSample | Skip:
    """decode_request for an index-entry request, reading through this process's open shard files."""
    if req.entry is None:
        return decode_request(req, encoder=encoder)
    from keye_train.data.shards.index import read_record

    try:
        source = SourceConfig(name=req.source, kind=req.kind, shards=[req.shard], weight=1.0)
        rec = read_record(req.shard, req.entry, source=source, fileobj=files.get(req.shard))
        return encoder.encode(rec)
    except Exception as exc:  # any bad input is a skip, with the reason format of decode_request
        return Skip(key=req.key, source=req.source, reason=f"{type(exc).__name__}: {exc}")


_WORKER_ENCODER: SampleEncoder | None = None
_WORKER_FILES = ShardFiles()


def _init_worker(tokenizer: Any, image_cfg: Any, video_cfg: Any) -> None:
    global _WORKER_ENCODER
    import torch

    torch.set_num_threads(1)  # workers decode in parallel already; intra-op threads would oversubscribe
    _WORKER_ENCODER = SampleEncoder(tokenizer, image_cfg=image_cfg, video_cfg=video_cfg)


def _decode_in_worker(req: DecodeRequest) -> EncodedSample | Skip:
    return decode_local(req, encoder=_WORKER_ENCODER, files=_WORKER_FILES)


class Decoder:
    """Turns DecodeRequests into EncodedSamples (or Skips), results in request order.

    workers=0 decodes in the calling thread; workers>0 uses a spawn-context process pool (spawn, not
    fork: the loader runs in a thread of a process that holds process groups and OpenMP pools). A remote
    decode function (I/O servers) replaces both when given.
    """

    def __init__(
        self,
        encoder: SampleEncoder,
        *,
        workers: int = 0,
        remote: Callable[[Sequence[DecodeRequest]], list[EncodedSample | Skip]] | None = None,
    ) -> None:
        if workers < 0:
            raise ValueError(f"loader.workers={workers} must be >= 0")
        self.encoder, self.workers, self.remote = encoder, workers, remote
        self.files = ShardFiles()  # the in-process decoder's; each worker process keeps its own
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, requests: Sequence[DecodeRequest]) -> list[EncodedSample | Skip]:
        if self.remote is not None:
            return list(self.remote(requests))
        if self.workers == 0:
            return [decode_local(r, encoder=self.encoder, files=self.files) for r in requests]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.encoder.tok, self.encoder.image_cfg, self.encoder.video_cfg),
            )
        # Chunks keep a shard's consecutive requests on one worker, which then reads them through one
        # open file instead of every worker opening every shard.
        chunk = max(1, len(requests) // (4 * self.workers))
        return list(self._pool.map(_decode_in_worker, requests, chunksize=chunk))

    def close(self) -> None:
        self.files.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _fit_sample(
    sample: EncodedSample, *, max_seq_len: int, overlong: str, vision_start: int, vision_end: int
) -> EncodedSample | str:
    """The sample, truncated if allowed and needed, or the reason it cannot enter any sequence."""
    if sample.num_tokens <= max_seq_len:
        return sample
    reason = f"overlong (actual): {sample.num_tokens} tokens > max_seq_len {max_seq_len}"
    if overlong == "truncate_text":
        try:
            return truncate_text(
                sample, max_len=max_seq_len, vision_start=vision_start, vision_end=vision_end
            )
        except ValueError as exc:
            reason += f", not truncatable: {exc}"
    return reason


def pack_planned(
    groups: list[list[EncodedSample | Skip]],
    *,
    predicted: list[list[int]],
    max_seq_len: int,
    pad_token_id: int,
    overlong: str,
    vision_start: int,
    vision_end: int,
    counter: SkipCounter,
) -> tuple[list[PackedBatch], dict[str, Any]]:
    """One PackedBatch per planned microbatch, with the samples in planned order.

    Predicted token counts can be off (text is estimated, the video slow/fast split is unknown before
    decoding). A microbatch whose actual tokens overflow hands its last samples to this replica's
    other microbatches with room; a sample that fits nowhere is a counted, logged skip. The number of
    microbatches never changes: every DP rank must run the same number of forward/backward passes.
    """
    bins: list[list[EncodedSample]] = []
    overflow: list[EncodedSample] = []
    actual = 0
    for group in groups:
        kept = []
        for item in group:
            if isinstance(item, Skip):
                counter.skip(item.source, item.key, item.reason)
                continue
            fitted = _fit_sample(
                item,
                max_seq_len=max_seq_len,
                overlong=overlong,
                vision_start=vision_start,
                vision_end=vision_end,
            )
            if isinstance(fitted, str):
                counter.skip(item.source, item.key, fitted)
                continue
            kept.append(fitted)
            actual += fitted.num_tokens
        while sum(s.num_tokens for s in kept) > max_seq_len:
            overflow.append(kept.pop())
        bins.append(kept)
    moved = 0
    for sample in overflow:
        room = [max_seq_len - sum(s.num_tokens for s in b) for b in bins]
        best = max(range(len(bins)), key=room.__getitem__)
        if room[best] >= sample.num_tokens:
            bins[best].append(sample)
            moved += 1
        else:
            counter.skip(
                sample.source,
                sample.key,
                f"no room: {sample.num_tokens} actual tokens exceed the planned microbatches' free space",
            )
    for sample in (s for b in bins for s in b):
        counter.ok(sample.source)
    batches = [build_batch(b, max_seq_len=max_seq_len, pad_token_id=pad_token_id) for b in bins]
    stats = {
        "predicted_tokens": sum(sum(p) for p in predicted),
        "actual_tokens": actual,
        "moved": moved,
        "unplaced": len(overflow) - moved,
    }
    return batches, stats
