"""PyAV decoding that costs what is sampled: seek to the keyframe before the frames needed, decode forward
only to them, hand the decoder no frame that nothing needs, and decode independent GOP runs in parallel.

Plan, from one demux pass (packets only, nothing decoded): every packet's display index (from its pts),
keyframes, and whether pts map one-to-one onto frame indices (constant frame rate). Then:
- **runs.** The wanted frames are grouped by the keyframe before them, and the groups are cut into
  contiguous runs, each starting at a keyframe; runs share no decoding, so worker threads (each with its
  own container and decoder; PyAV releases the GIL while decoding and converting) decode them at once.
  One worker: a single run, with FFmpeg's own frame threading instead;
- **seek or run on.** Inside a run, for each group of wanted frames that share a keyframe, the decoder
  either runs on from where it is or seeks to that keyframe; the plan picks, per video (per run),
  whichever decodes fewer frames (counting a seek as SEEK_COST frames: flushing and refilling the
  decoder's pipeline);
- **skip non-reference frames.** While a packet's frame is not wanted, the decoder is told to discard
  non-reference frames (FFmpeg's skip_frame=NONREF): nothing predicts from those, so every frame that is
  decoded comes out bit-identical to a full decode;
- **convert only what is kept**, straight into one preallocated (n, H, W, 3) array: no per-frame copies
  to stack afterwards.
A video whose pts do not map one-to-one onto indices (variable frame rate, edit lists) falls back to the
sequential count, which is what decord and a full decode index by.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from keye_train.data.media.threads import worker_count

SEEK_COST = 4.0  # frames' worth of decoding one seek is taken to cost (decoder flush + refill): an estimate
RUNS_PER_WORKER = 4  # more runs than workers: a worker slowed down (a busy core) leaves runs to the others


@dataclass
class PacketMap:
    """The video's packets in decode order: display index, keyframe flag."""

    index: list[int]
    keyframe: list[bool]
    pts_exact: bool  # pts -> index is one-to-one over 0..n-1


class KeptFrames(dict):
    """{display index: (H, W, 3) uint8 RGB}; every value is a row of `array`, which holds the wanted
    frames in ascending index order (so a caller can take them all without stacking copies)."""

    array: np.ndarray


def _to_index(pts: int, start: int, time_base: float, fps: float) -> int:
    return round((pts - start) * time_base * fps)


def packet_map(container, stream, fps: float) -> PacketMap:
    start = stream.start_time or 0
    tb = float(stream.time_base)
    index, keyframe = [], []
    for packet in container.demux(stream):
        if packet.size == 0 or packet.pts is None:
            continue
        index.append(_to_index(packet.pts, start, tb, fps))
        keyframe.append(bool(packet.is_keyframe))
    exact = sorted(index) == list(range(len(index)))
    return PacketMap(index=index, keyframe=keyframe, pts_exact=exact)


def gop_starts(pmap: PacketMap) -> list[int]:
    """Display index of each keyframe, ascending."""
    return sorted(i for i, k in zip(pmap.index, pmap.keyframe) if k)


def _keyframe_before(w: int, keyframes: list[int]) -> int:
    return keyframes[max(0, np.searchsorted(keyframes, w, side="right") - 1)] if keyframes else 0


def plan_seeks(wanted: list[int], keyframes: list[int], *, start: int = 0) -> tuple[list[int], float, float]:
    """(keyframes to seek to, cost with those seeks, cost of one sequential run), in decoded frames,
    for a decoder that starts at display position `start` (a keyframe).

    The decoder is at display position `pos`; a wanted frame w with keyframe k = the last keyframe <= w:
    running on costs w - pos frames, seeking costs SEEK_COST + (w - k). Seek when cheaper. (B-frames make
    decode order differ from display order by a few frames; costs here are estimates for the choice.)
    """
    seeks: list[int] = []
    pos, cost = start, 0.0
    for w in sorted(wanted):
        k = _keyframe_before(w, keyframes)
        run_on = w - pos + 1 if w >= pos else float("inf")
        seek = SEEK_COST + (w - k + 1)
        if k > pos and seek < run_on:
            seeks.append(k)
            cost += seek
        else:
            cost += max(0, w - pos + 1)
        pos = w + 1
    return seeks, cost, float(max(wanted) + 1 - start)


def split_runs(targets: list[int], keyframes: list[int], runs: int) -> list[tuple[int, list[int]]]:
    """Sorted targets cut into min(runs, keyframe groups) contiguous runs of whole keyframe groups,
    balanced by the frames each group spans from its keyframe; each run is (keyframe it starts at, its
    targets)."""
    groups: list[tuple[int, list[int]]] = []
    for t in targets:
        k = _keyframe_before(t, keyframes)
        if groups and groups[-1][0] == k:
            groups[-1][1].append(t)
        else:
            groups.append((k, [t]))
    spans = [ts[-1] - k + 1 for k, ts in groups]
    total, runs = sum(spans), max(1, min(runs, len(groups)))
    out: list[tuple[int, list[int]]] = []
    done = 0
    for j, ((k, ts), span) in enumerate(zip(groups, spans)):
        # a new run where this group's middle passes the next equal share, or where every group left
        # must start one to make `runs`
        due = done + span / 2 >= total * len(out) / runs or len(groups) - j <= runs - len(out)
        if not out or (len(out) < runs and due):
            out.append((k, []))
        out[-1][1].extend(ts)
        done += span
    return out


def decode_planned(
    av, source: str | os.PathLike | bytes, *, wanted: set[int], fps: float, what: str, threads: int = 0
) -> tuple[KeptFrames, dict]:
    """RGB frames {index: (H, W, 3) uint8, rows of one array} of the wanted display indices, and what
    the plan did ("frames_decoded": frames the decoders returned; the few references decoded last before
    a segment stops are not returned, so the decoding done is slightly more). `threads`: decoding threads
    (0: one per CPU available, see worker_count).

    Raises ValueError when the stream cannot be mapped by pts or its frames change size (the caller
    decodes sequentially then).
    """
    opened = lambda: av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source))  # noqa: E731
    with opened() as container:
        stream = container.streams.video[0]
        height, width = stream.codec_context.height, stream.codec_context.width
        pmap = packet_map(container, stream, fps)
    if not pmap.pts_exact:
        raise ValueError(f"video {what}: packet timestamps do not map one-to-one onto frame indices")
    keyframes = gop_starts(pmap)
    todo = sorted(wanted)
    budget = worker_count(threads)
    runs = split_runs(todo, keyframes, 1 if budget == 1 else RUNS_PER_WORKER * budget)
    workers = min(budget, len(runs))
    kept = KeptFrames()
    # torch's allocator, not numpy's: numpy asks for transparent huge pages on large arrays, and where the
    # kernel compacts memory for them on first touch (THP defrag=madvise) filling costs several times more
    kept.array = torch.empty((len(todo), height, width, 3), dtype=torch.uint8).numpy()
    slot = {idx: row for row, idx in enumerate(todo)}

    def store(idx: int, frame) -> None:
        if (frame.height, frame.width) != (height, width):
            got = f"{frame.width}x{frame.height}"
            raise ValueError(f"video {what}: frame {idx} is {got}, not {width}x{height}")
        kept.array[slot[idx]] = frame.to_ndarray(format="rgb24")

    pending: queue.SimpleQueue = queue.SimpleQueue()
    for run in runs:
        pending.put(run)
    job = dict(
        av=av, opened=opened, fps=fps, wanted=wanted, keyframes=keyframes, pending=pending, store=store
    )
    # one worker: FFmpeg frame threading over all the budget; several: one single-threaded decoder each
    codec_threads = budget if workers == 1 else max(1, budget // workers)
    if workers == 1:
        counts = [_decode_runs(**job, codec_threads=codec_threads)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_decode_runs, **job, codec_threads=codec_threads) for _ in range(workers)]
            counts = [f.result() for f in futures]
    stored = set().union(*(c[2] for c in counts))
    for idx in todo:
        if idx in stored:  # a target missing from the stream (truncated file) is left out: the caller says so
            kept[idx] = kept.array[slot[idx]]
    info = {
        "seeks": sum(c[1] for c in counts),
        "frames_decoded": sum(c[0] for c in counts),
        "packets": len(pmap.index),
        "workers": workers,
        "runs": len(runs),
    }
    return kept, info


def _decode_runs(
    *, av, opened, fps, wanted, keyframes, pending, store, codec_threads: int
) -> tuple[int, int, set[int]]:
    """Decode runs taken from `pending` until none is left, on one container and decoder:
    (frames decoded, seeks made, indices stored)."""
    decoded = seeks = 0
    stored: set[int] = set()
    with opened() as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if codec_threads > 1:
            stream.thread_type = "AUTO"  # frame + slice threading: same frames, faster
        ctx.thread_count = codec_threads
        first = True
        while True:
            try:
                run_start, targets = pending.get_nowait()
            except queue.Empty:
                break
            inner, cost, sequential = plan_seeks(targets, keyframes, start=run_start)
            if cost >= sequential:
                inner = []
            # a fresh decoder at the first keyframe needs no seek; any other run starts with one
            lead = None if first and run_start == (keyframes[0] if keyframes else 0) else run_start
            first = False
            for seek_to, segment in _segments(targets, inner, lead=lead):
                n, found = _decode_segment(
                    av,
                    container,
                    stream,
                    seek_to=seek_to,
                    targets=segment,
                    wanted=wanted,
                    fps=fps,
                    store=store,
                )
                decoded += n
                seeks += seek_to is not None
                stored |= found
    return decoded, seeks, stored


def _decode_segment(
    av, container, stream, *, seek_to: int | None, targets: list[int], wanted: set[int], fps: float, store
) -> tuple[int, set[int]]:
    """Seek (unless seek_to is None) and decode forward until every target is stored."""
    ctx = stream.codec_context
    start, tb = stream.start_time or 0, float(stream.time_base)
    if seek_to is not None:
        # seek to the keyframe at or before seek_to (backward), in the stream's time base
        container.seek(start + round(seek_to / fps / tb), stream=stream, backward=True, any_frame=False)
    missing, found, decoded = set(targets), set(), 0

    def take(frames) -> None:
        nonlocal decoded
        for frame in frames:
            decoded += 1
            idx = _to_index(frame.pts, start, tb, fps)
            if idx in missing:  # converted to RGB only here: frames nothing keeps never are
                store(idx, frame)
                missing.discard(idx)
                found.add(idx)

    for packet in container.demux(stream):
        if packet.pts is not None:
            ctx.skip_frame = "DEFAULT" if _to_index(packet.pts, start, tb, fps) in wanted else "NONREF"
        take(ctx.decode(packet) if packet.size else ctx.decode(None))
        if not missing:
            break
    if missing:  # end of stream: flush what the decoder still holds
        ctx.skip_frame = "DEFAULT"
        with contextlib.suppress(av.error.EOFError):  # the demux loop's empty packet flushed it already
            take(ctx.decode(None))
    ctx.flush_buffers()  # the next segment starts with a seek, from a clean decoder
    return decoded, found


def _segments(
    targets: list[int], seeks: list[int], *, lead: int | None
) -> list[tuple[int | None, list[int]]]:
    """Wanted frames grouped by the seek that precedes them (`lead` for the first group: None, no seek)."""
    out: list[tuple[int | None, list[int]]] = [(lead, [])]
    pending = list(seeks)
    for t in targets:
        while pending and pending[0] <= t:
            out.append((pending.pop(0), []))
        out[-1][1].append(t)
    return [(s, ts) for s, ts in out if ts]
