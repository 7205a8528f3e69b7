"""Video decoding to uint8 RGB frames: PyAV or decord from a path or bytes, and image-list videos."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from keye_train.data.media.image import open_image, resize_image_bicubic, smart_resize, to_rgb

DECODERS = ("auto", "pyav", "decord")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# (total_frames, native_fps) -> the frame indices to keep
IndexPicker = Callable[[int, float], list[int]]


@dataclass
class DecodedFrames:
    """The sampled frames of one video, before any resizing."""

    frames: Tensor  # (n, 3, H, W) uint8 RGB
    indices: list[int]  # index of each kept frame in the full video
    native_fps: float
    total_frames: int

    @property
    def duration(self) -> float:
        return self.total_frames / self.native_fps


def _describe(source: str | os.PathLike | bytes) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else repr(os.fspath(source))


def _check_picked(indices: list[int], total: int, what: str) -> None:
    if not indices or min(indices) < 0 or max(indices) >= total:
        raise ValueError(f"video {what}: frame indices {indices[:4]}... do not fit {total} frames")


def _stack(arrays: list[np.ndarray]) -> Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def video_stream_header(container, what: str) -> tuple[object, float, int]:
    """A PyAV container's first video stream, its frame rate and the frame count it announces (0 when not
    recorded). The decoder and the shard index both read a video's header through this, so the index
    predicts from exactly the rate and count the decoder will use."""
    if not container.streams.video:
        raise ValueError(f"video {what} has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate or float(rate) <= 0:
        raise ValueError(f"video {what}: the stream has no frame rate")
    return stream, float(rate), stream.frames


def decode_pyav(source: str | os.PathLike | bytes, pick: IndexPicker, *, threads: int = 0) -> DecodedFrames:
    """Decode with PyAV, keeping only the picked frames (converted to RGB as decoded, in display order).
    `threads`: decoding threads for one video (0: one per CPU available).

    Frames are counted as the container announces them, as decord does; a file whose picked frames do
    not all decode is truncated or corrupt and raises ValueError.
    """
    import av

    what = _describe(source)
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source))
    except av.error.FFmpegError as exc:
        raise ValueError(
            f"cannot open video {what}: {exc}; the file is corrupt, truncated or not a video"
        ) from exc
    with container:
        stream, native_fps, total = video_stream_header(container, what)
        if total <= 0:  # not recorded by some containers (mkv, webm): count packets without decoding
            total = _count_packets(av, source, what)
        if total <= 0:
            raise ValueError(f"video {what} has no frames")
        indices = pick(total, native_fps)
        _check_picked(indices, total, what)
        kept = _decode_planned(av, source, set(indices), native_fps, what, threads)
        decoded = len(kept or ())
        if kept is None or len(kept) != len(set(indices)):  # no pts map or a frame missing: count frames
            kept, decoded = _decode_wanted(av, container, stream, set(indices), what)
    missing = [i for i in indices if i not in kept]
    if missing:
        raise ValueError(
            f"video {what} is truncated or corrupt: it announces {total} frames but only {decoded} decode "
            f"(frame {missing[0]} is missing)"
        )
    if getattr(kept, "array", None) is not None and indices == sorted(kept):
        frames = torch.from_numpy(kept.array).permute(0, 3, 1, 2)  # already one array in this order
    else:  # the sequential decoder's frames, or repeated indices
        frames = _stack([kept[i] for i in indices])
    return DecodedFrames(frames=frames, indices=indices, native_fps=native_fps, total_frames=total)


def _decode_planned(
    av, source, wanted: set[int], fps: float, what: str, threads: int
) -> dict[int, np.ndarray] | None:
    """The wanted frames by seeking and skipping (video_seek), or None where that cannot be used."""
    from keye_train.data.media.video_seek import decode_planned

    try:
        kept, _ = decode_planned(av, source, wanted=wanted, fps=fps, what=what, threads=threads)
    except (ValueError, av.error.FFmpegError):  # sequential decoding gives the reason, or the frames
        return None
    return kept


def _count_packets(av, source: str | os.PathLike | bytes, what: str) -> int:
    # a separate pass over a fresh container: seeking back is not exact in every format
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot read video {what}: {exc}; it is corrupt or truncated") from exc


def _decode_wanted(av, container, stream, wanted: set[int], what: str) -> tuple[dict[int, np.ndarray], int]:
    stream.thread_type = "AUTO"  # frame threading: same frames, faster
    last = max(wanted)
    kept: dict[int, np.ndarray] = {}
    count = 0
    try:
        for frame in container.decode(stream):
            if count in wanted:
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > last:  # nothing further is needed
                break
    except av.error.FFmpegError as exc:
        raise ValueError(
            f"cannot decode video {what} after {count} frames: {exc}; it is corrupt or truncated"
        ) from exc
    return kept, count


def decode_decord(source: str | os.PathLike | bytes, pick: IndexPicker) -> DecodedFrames:
    """Decode with decord (the reader keye-vl-utils uses); RuntimeError if decord is not installed."""
    try:
        import decord
    except ImportError as exc:
        raise RuntimeError(
            "decoder='decord' needs the decord package: pip install decord, or use 'pyav'"
        ) from exc
    what = _describe(source)
    try:
        reader = decord.VideoReader(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source))
        total, native_fps = len(reader), float(reader.get_avg_fps())
        if total <= 0 or native_fps <= 0:
            raise ValueError(
                f"video {what}: it has no frames or no frame rate ({total} frames, {native_fps} fps)"
            )
        indices = pick(total, native_fps)
        _check_picked(indices, total, what)
        frames = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2)
    except (decord.DECORDError, RuntimeError) as exc:  # decord raises plain RuntimeError for unreadable input
        raise ValueError(f"cannot decode video {what}: {exc}; the file is corrupt or not a video") from exc
    return DecodedFrames(frames=frames, indices=indices, native_fps=native_fps, total_frames=total)


def decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def decode_video(
    source: str | os.PathLike | bytes, pick: IndexPicker, *, decoder: str = "auto", threads: int = 0
) -> DecodedFrames:
    """Decode a video file or its bytes, keeping the frames `pick(total_frames, native_fps)` selects.
    `threads`: PyAV decoding threads for this video (0: one per CPU available); decord picks its own."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = bytes(source)
        if not source:
            raise ValueError("video bytes are empty")
    elif not Path(source).is_file():
        raise ValueError(f"video file {os.fspath(source)!r} does not exist or is not a file")
    if decoder == "auto":
        # PyAV with planned seeking and skipped non-reference frames (video_seek) decodes only what is
        # sampled; decord decodes every frame up to the last one sampled. Both give the same frames.
        decoder = "pyav"
    if decoder == "pyav":
        return decode_pyav(source, pick, threads=threads)
    if decoder == "decord":
        return decode_decord(source, pick)
    raise ValueError(f"video decoder={decoder!r} is not supported; use one of {DECODERS}")


def _natural_key(name: str) -> list:
    # frame_2.jpg sorts before frame_10.jpg
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """Image files of a frame folder, in natural name order; ValueError if there are none."""
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(
            f"frame folder {os.fspath(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    return sorted(files, key=lambda p: _natural_key(p.name))


def load_frame_list(
    frames: Sequence[PIL.Image.Image] | str | os.PathLike,
    *,
    fps: float,
    pick: IndexPicker,
    min_pixels: int,
    max_pixels: int,
    factor: int,
    max_aspect_ratio: float,
) -> DecodedFrames:
    """An image-list video: the picked images are resized one by one (smart resize within the per-frame
    pixel range, PIL bicubic, as keye-vl-utils does for such videos). Files of a folder are decoded only
    when picked. All picked images must end up the same size, since they form one video.
    """
    if isinstance(frames, str | os.PathLike):
        images: Sequence = list_frame_files(frames)
    else:
        images = list(frames)
    if not images:
        raise ValueError("image-list video has no frames")
    if not fps or fps <= 0:
        raise ValueError(f"image-list video needs a positive fps (frames per second), got fps={fps!r}")
    indices = pick(len(images), float(fps))
    _check_picked(indices, len(images), "image list")
    arrays = []
    for i in indices:
        image = open_image(images[i]) if isinstance(images[i], Path) else images[i]
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"image-list video frame {i} is a {type(image).__name__}, not a PIL.Image.Image")
        rgb = to_rgb(image)
        width, height = rgb.size
        size = smart_resize(
            height,
            width,
            factor=factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            max_aspect_ratio=max_aspect_ratio,
        )
        arrays.append(np.asarray(resize_image_bicubic(rgb, size), dtype=np.uint8))
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(
            f"image-list video frames resize to different sizes {sorted(sizes)}; give same-sized frames"
        )
    return DecodedFrames(
        frames=_stack(arrays), indices=indices, native_fps=float(fps), total_frames=len(images)
    )
