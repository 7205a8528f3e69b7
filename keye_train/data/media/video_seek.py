"""PyAV decoding that costs what is sampled: seek to the keyframe before the frames needed, decode forward
only to them, and hand the decoder no frame that nothing needs.

Plan, from one demux pass (packets only, nothing decoded): every packet's display index (from its pts),
keyframes, and whether pts map one-to-one onto frame indices (constant frame rate). Then:
- **seek or run on.** For each group of wanted frames that share a keyframe, the decoder either runs on
  from where it is or seeks to that keyframe; the plan picks, per video, whichever decodes fewer
  frames (counting a seek as SEEK_COST frames: flushing and refilling the decoder's pipeline);
- **skip non-reference frames.** While a packet's frame is not wanted, the decoder is told to discard
  non-reference frames (FFmpeg's skip_frame=NONREF): nothing predicts from those, so every frame that is
  decoded comes out bit-identical to a full decode.
A video whose pts do not map one-to-one onto indices (variable frame rate, edit lists) falls back to the
sequential count, which is what decord and a full decode index by.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

SEEK_COST = 4.0  # frames' worth of decoding one seek is taken to cost (decoder flush + refill): an estimate


@dataclass
class PacketMap:
    """The video's packets in decode order: display index, keyframe flag."""

    index: list[int]
    keyframe: list[bool]
    pts_exact: bool  # pts -> index is one-to-one over 0..n-1


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


def plan_seeks(wanted: list[int], keyframes: list[int]) -> tuple[list[int], float, float]:
    """(keyframes to seek to, cost with those seeks, cost of one sequential run), in decoded frames.

    The decoder is at display position `pos`; a wanted frame w with keyframe k = the last keyframe <= w:
    running on costs w - pos frames, seeking costs SEEK_COST + (w - k). Seek when cheaper. (B-frames make
    decode order differ from display order by a few frames; costs here are estimates for the choice.)
    """
    seeks: list[int] = []
    pos, cost = 0, 0.0
    for w in sorted(wanted):
        k = keyframes[max(0, np.searchsorted(keyframes, w, side="right") - 1)] if keyframes else 0
        run_on = w - pos + 1 if w >= pos else float("inf")
        seek = SEEK_COST + (w - k + 1)
        if k > pos and seek < run_on:
            seeks.append(k)
            cost += seek
        else:
            cost += max(0, w - pos + 1)
        pos = w + 1
    return seeks, cost, float(max(wanted) + 1)


def decode_planned(
    av, source: str | os.PathLike | bytes, *, wanted: set[int], fps: float, what: str
) -> tuple[dict[int, np.ndarray], dict]:
    """RGB frames {index: (H, W, 3) uint8} of the wanted display indices, and what the plan did.

    Raises ValueError when the stream cannot be mapped by pts (the caller decodes sequentially then).
    """
    opened = lambda: av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source))  # noqa: E731
    with opened() as container:
        stream = container.streams.video[0]
        pmap = packet_map(container, stream, fps)
    if not pmap.pts_exact:
        raise ValueError(f"video {what}: packet timestamps do not map one-to-one onto frame indices")
    keyframes = gop_starts(pmap)
    seeks, seek_cost, sequential = plan_seeks(sorted(wanted), keyframes)
    if seek_cost >= sequential:
        seeks = []
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    todo = sorted(wanted)
    with opened() as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        ctx = stream.codec_context
        start, tb = stream.start_time or 0, float(stream.time_base)
        segments = _segments(todo, seeks)
        for seek_to, targets in segments:
            if seek_to is not None:
                # seek to the keyframe at or before seek_to (backward), in the stream's time base
                container.seek(
                    start + round(seek_to / fps / tb), stream=stream, backward=True, any_frame=False
                )
            need = set(targets)
            last = max(targets)
            done = False
            for packet in container.demux(stream):
                if packet.pts is not None:
                    idx = _to_index(packet.pts, start, tb, fps)
                    ctx.skip_frame = "DEFAULT" if idx in wanted else "NONREF"
                frames = ctx.decode(packet) if packet.size else ctx.decode(None)
                for frame in frames:
                    decoded += 1
                    idx = _to_index(frame.pts, start, tb, fps)
                    if idx in need and idx not in kept:
                        kept[idx] = frame.to_ndarray(format="rgb24")
                    if idx >= last and all(t in kept for t in targets):
                        done = True
                if done:
                    break
            if not done:  # end of stream: flush what the decoder still holds
                ctx.skip_frame = "DEFAULT"
                try:
                    rest = ctx.decode(None)
                except av.error.EOFError:
                    rest = []
                for frame in rest:
                    decoded += 1
                    idx = _to_index(frame.pts, start, tb, fps)
                    if idx in need and idx not in kept:
                        kept[idx] = frame.to_ndarray(format="rgb24")
            if seek_to is not None or done:
                ctx.flush_buffers()  # the next segment starts clean (seeks) or this one is finished
    return kept, {"seeks": len(seeks), "frames_decoded": decoded, "packets": len(pmap.index)}


def _segments(targets: list[int], seeks: list[int]) -> list[tuple[int | None, list[int]]]:
    """Wanted frames grouped by the seek that precedes them (None: the first run from the start)."""
    out: list[tuple[int | None, list[int]]] = [(None, [])]
    pending = list(seeks)
    for t in targets:
        while pending and pending[0] <= t:
            out.append((pending.pop(0), []))
        out[-1][1].append(t)
    return [(s, ts) for s, ts in out if ts]
