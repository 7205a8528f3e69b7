"""SlowFast video preprocessing (KEYE_SPEC "SlowFast video"): config, planning, pixels and inspection."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import Tensor

from keye_train.data.batch import FrameSpec
from keye_train.data.media import slowfast
from keye_train.data.media.image import check_pixel_stats, normalize_patchify, resize_frames
from keye_train.data.media.threads import chunks, ordered_map, worker_count
from keye_train.data.media.video_decode import DECODERS, DecodedFrames, decode_video, load_frame_list


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class VideoConfig:
    """SlowFast video settings. Defaults reproduce keye-vl-utils 1.5.2 (`keye_vl_utils/vision_process.py`,
    "vp" below) and the Keye-VL-1.5 processor; `VideoConfig.paper()` gives the technical report's values."""

    fps: float = 2.0
    """Sampling rate, frames per second (used as min(fps, native fps)); vp `FPS`."""
    max_frames: int | None = None
    """Frame cap; None: video_max_tokens // min_tokens_per_frame (1365), as vp `smart_nframes`."""
    video_max_tokens: int = 65536
    """Token budget of one video; vp `VIDEO_TOTAL_PIXELS` / 28^2. Paper: 75,000."""
    min_tokens_per_frame: int = 48
    """Fewest tokens of any frame (slow or fast); vp `VIDEO_MIN_TOKENS`."""
    max_tokens_per_frame: int = 768
    """Most tokens of a slow frame; vp `VIDEO_MAX_TOKENS`."""
    fast_token_ratio: float = 0.3
    """Fast-frame tokens as a fraction of the slow frame's; vp `FAST_TOKEN_RATIO`."""
    fast_min_tokens: int = 48
    """Floor of the fast-frame token cap. vp `fetch_video` uses the constant VIDEO_MIN_PIXELS here, not
    the (possibly raised) per-frame minimum, so a fast frame can end below min_tokens_per_frame."""
    min_frame_similarity: float = 0.9
    """A frame less similar than this to the last slow frame is slow, else fast; vp
    `MIN_FRAME_SIMILARITY`. Paper: 0.95."""
    patch_similarity_threshold: float = 0.7
    """A patch is similar when its HSV cosine exceeds this; vp `get_frame_sim(threshold=0.7)`."""
    similarity_patch_size: int = 28
    """Side in pixels of the patches compared; vp `get_frame_sim(patch_size=28)`."""
    similarity_max_tokens: int = 256
    """Frames are compared resized to at most this many tokens; vp `extract_slow_fast_frames`."""
    similarity_min_tokens: int = 48
    """...and at least this many (vp uses VIDEO_MIN_PIXELS there)."""
    blank_patch_norm: float = 0.01
    """Patches with an HSV norm below this in both frames are ignored; vp `get_frame_sim`."""
    similarity_eps: float = 1e-8
    """Added to patch norms before dividing; vp `get_frame_sim(epsilon=1e-8)`."""
    strict_token_budget: bool = False
    """False: the released binary search, whose slow-frame cap is one token above the largest that
    fits, so a video can exceed the budget slightly. True: never exceed it (KEYE_SPEC wording)."""
    resample_frame_lists: bool = False
    """False: an image-list video is taken as already sampled (every frame kept up to the cap), as vp
    `fetch_video` does for lists. True: sample it at `fps` like a decoded video."""
    decoder: str = "auto"
    """Video reader: "auto" (= "pyav"), "pyav" (seeks, skips what is not sampled: media/video_seek.py),
    or "decord" (the reader vp uses; decodes every frame up to the last sampled one)."""
    threads: int = 0
    """Threads working on one video: PyAV decodes independent keyframe runs in parallel, one decoder
    each (a single run uses FFmpeg's frame threading instead), and the sampled frames are resized and
    compared for SlowFast typing on as many. 0: one per CPU this process may run on
    (os.sched_getaffinity), at most 8; set 1 when loader worker processes already fill the cores. Same
    output."""
    patch_size: int = 14
    """ViT patch side in pixels (SigLIP patch14)."""
    merge_size: int = 2
    """Patches merged per side into one LLM token (projector 2x2 merge)."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Pixel normalisation mean (SigLIP, Keye-VL-1.5 processor)."""
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Pixel normalisation std (SigLIP, Keye-VL-1.5 processor)."""
    max_aspect_ratio: float = 200.0
    """Longer/shorter side limit; vp `MAX_RATIO`."""

    def __post_init__(self) -> None:
        positive = (
            "fps",
            "video_max_tokens",
            "min_tokens_per_frame",
            "fast_min_tokens",
            "similarity_patch_size",
        )
        positive += ("similarity_max_tokens", "similarity_min_tokens", "patch_size", "merge_size")
        for name in positive:
            value = getattr(self, name)
            _require(value > 0, f"video.{name}={value} must be positive")
        _require(
            self.max_tokens_per_frame >= self.min_tokens_per_frame,
            f"video.max_tokens_per_frame={self.max_tokens_per_frame} must be >= "
            f"video.min_tokens_per_frame={self.min_tokens_per_frame}",
        )
        _require(
            self.similarity_max_tokens >= self.similarity_min_tokens,
            f"video.similarity_max_tokens={self.similarity_max_tokens} must be >= "
            f"video.similarity_min_tokens={self.similarity_min_tokens}",
        )
        _require(
            self.video_max_tokens >= self.min_tokens_per_frame,
            f"video.video_max_tokens={self.video_max_tokens} cannot hold one frame of "
            f"min_tokens_per_frame={self.min_tokens_per_frame}",
        )
        _require(
            self.max_frames is None or self.max_frames >= 1,
            f"video.max_frames={self.max_frames} must be >= 1 or None",
        )
        for name in ("fast_token_ratio", "min_frame_similarity", "patch_similarity_threshold"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"video.{name}={value} must be within [0, 1]")
        _require(self.blank_patch_norm >= 0, f"video.blank_patch_norm={self.blank_patch_norm} must be >= 0")
        _require(self.similarity_eps > 0, f"video.similarity_eps={self.similarity_eps} must be positive")
        _require(
            self.factor % self.similarity_patch_size == 0,
            f"video.similarity_patch_size={self.similarity_patch_size} must divide the token side "
            f"{self.factor}",
        )
        _require(self.decoder in DECODERS, f"video.decoder={self.decoder!r} is not one of {DECODERS}")
        _require(
            isinstance(self.threads, int) and not isinstance(self.threads, bool) and self.threads >= 0,
            f"video.threads={self.threads!r} must be an integer >= 0 (0: one per CPU available)",
        )
        _require(self.max_aspect_ratio >= 1, f"video.max_aspect_ratio={self.max_aspect_ratio} must be >= 1")
        self.mean, self.std = check_pixel_stats(self.mean, self.std, "video")

    @classmethod
    def paper(cls, **overrides: Any) -> VideoConfig:
        """The technical report's values (budget 75,000 tokens, similarity threshold 0.95)."""
        return cls(**{"video_max_tokens": 75000, "min_frame_similarity": 0.95, **overrides})

    @property
    def factor(self) -> int:
        """Side in pixels of one LLM token (28)."""
        return self.patch_size * self.merge_size

    @property
    def frame_cap(self) -> int:
        """Most frames sampled from one video."""
        area = self.factor**2
        cap = int(self.video_max_tokens * area / (self.min_tokens_per_frame * area))
        return cap if self.max_frames is None else min(self.max_frames, cap)


@dataclass(frozen=True)
class FrameList:
    """A video given as still images (PIL images, or a folder of image files in natural name order)."""

    frames: Sequence[PIL.Image.Image] | str | os.PathLike
    fps: float  # rate of the given frames; timestamps are index / fps

    def __post_init__(self) -> None:
        if isinstance(self.fps, bool) or not isinstance(self.fps, int | float) or not self.fps > 0:
            raise ValueError(f"FrameList.fps={self.fps!r} must be a positive number (frames per second)")


VideoSource = str | os.PathLike | bytes | FrameList


@dataclass
class VideoPlan:
    """Which frames are kept, their types and sizes; no pixels."""

    frames: list[FrameSpec]
    slow_hw: tuple[int, int]  # pixels
    fast_hw: tuple[int, int]
    native_fps: float
    total_frames: int

    @property
    def duration(self) -> float:
        return self.total_frames / self.native_fps

    @property
    def num_tokens(self) -> int:
        return sum(f.num_tokens for f in self.frames)


@dataclass
class VideoResult(VideoPlan):
    """A preprocessed video: the plan plus patches and grids for every frame in order."""

    pixel_values: Tensor = field(default_factory=lambda: torch.empty(0, 3, 14, 14))  # (sum patches, 3, p, p)
    grid_thw: Tensor = field(default_factory=lambda: torch.empty(0, 3, dtype=torch.long))  # rows (1, h, w)


def _decode(source: VideoSource, cfg: VideoConfig) -> DecodedFrames:
    def pick_video(total: int, native_fps: float) -> list[int]:
        return slowfast.sample_indices(total, slowfast.num_sampled_frames(total, native_fps, cfg))

    if isinstance(source, FrameList):
        # released behaviour: the list's own fps is also the sampling fps, so no frame is dropped
        list_cfg = cfg if cfg.resample_frame_lists else replace(cfg, fps=float(source.fps))
        return load_frame_list(
            source.frames,
            fps=source.fps,
            pick=lambda total, fps: slowfast.sample_indices(
                total, slowfast.num_sampled_frames(total, fps, list_cfg)
            ),
            min_pixels=cfg.min_tokens_per_frame * cfg.factor**2,
            max_pixels=cfg.max_tokens_per_frame * cfg.factor**2,
            factor=cfg.factor,
            max_aspect_ratio=cfg.max_aspect_ratio,
        )
    if isinstance(source, list | tuple):
        raise ValueError("a list of frames is an image-list video: pass FrameList(frames, fps=...)")
    if isinstance(source, str | os.PathLike) and Path(source).is_dir():
        raise ValueError(f"{os.fspath(source)!r} is a folder: pass FrameList({os.fspath(source)!r}, fps=...)")
    return decode_video(source, pick_video, decoder=cfg.decoder, threads=cfg.threads)


def plan_video(decoded: DecodedFrames, cfg: VideoConfig) -> VideoPlan:
    """Frame types (slow/fast) and sizes for decoded frames."""
    height, width = decoded.frames.shape[-2:]
    if height == 0 or width == 0:
        raise ValueError(f"video frames have an empty size {height}x{width} (HxW)")
    is_fast = slowfast.classify_frames(decoded.frames, cfg, threads=worker_count(cfg.threads))
    sizes = slowfast.frame_sizes(height, width, is_fast=is_fast, cfg=cfg)
    patch = cfg.patch_size
    frames = [
        FrameSpec(
            index=index,
            timestamp=slowfast.frame_timestamp(index, decoded.native_fps),
            is_fast=fast,
            grid_hw=tuple(s // patch for s in (sizes.fast_hw if fast else sizes.slow_hw)),
        )
        for index, fast in zip(decoded.indices, is_fast)
    ]
    return VideoPlan(
        frames=frames,
        slow_hw=sizes.slow_hw,
        fast_hw=sizes.fast_hw,
        native_fps=decoded.native_fps,
        total_frames=decoded.total_frames,
    )


def decode_and_plan(source: VideoSource, cfg: VideoConfig) -> tuple[DecodedFrames, VideoPlan]:
    """Decode and sample a video, and type its frames slow/fast with their sizes: the sampled frames at
    full size and the plan. This is what keye-vl-utils' `fetch_video` returns (frames, types, sizes)."""
    decoded = _decode(source, cfg)
    return decoded, plan_video(decoded, cfg)


def resize_video(source: VideoSource, cfg: VideoConfig) -> tuple[VideoPlan, dict[bool, Tensor]]:
    """Decode, sample, type slow/fast and resize: the plan and the uint8 frames per kind
    ({False: slow frames, True: fast frames}, each (n, 3, h, w) in frame order): `fetch_video`'s work
    plus the processor's resize; `preprocess_video` adds normalisation and patching."""
    decoded, plan = decode_and_plan(source, cfg)
    # Consecutive frames of one kind are resized straight from slices of the decoded frames (views):
    # gathering a kind first would copy every full-size frame once more. Runs are cut into parts resized
    # on cfg.threads threads; each frame is resized on its own either way, so the pixels are the same.
    threads = worker_count(cfg.threads)
    jobs: list[tuple[bool, range]] = []
    begin = 0
    for i, frame in enumerate(plan.frames):
        if i + 1 == len(plan.frames) or plan.frames[i + 1].is_fast != frame.is_fast:
            jobs += [
                (frame.is_fast, range(begin + r.start, begin + r.stop))
                for r in chunks(i + 1 - begin, threads)
            ]
            begin = i + 1

    def resize(job: tuple[bool, range]) -> Tensor:
        fast, part = job
        return resize_frames(decoded.frames[part.start : part.stop], plan.fast_hw if fast else plan.slow_hw)

    parts: dict[bool, list[Tensor]] = {False: [], True: []}
    for (fast, _), out in zip(jobs, list(ordered_map(resize, jobs, threads))):
        parts[fast].append(out)
    return plan, {fast: torch.cat(ps) if len(ps) > 1 else ps[0] for fast, ps in parts.items() if ps}


def preprocess_video(source: VideoSource, cfg: VideoConfig) -> VideoResult:
    """Decode, sample, type and resize a video into ViT patches (slow and fast frames sized apart).

    `source`: a file path, the file's bytes (e.g. a webdataset member) or a FrameList. Bad input
    (missing, corrupt or truncated file, no frames, empty size) raises ValueError with the reason.
    """
    plan, resized = resize_video(source, cfg)
    # Each kind is normalised and patchified in one call, then interleaved back into frame order.
    per_kind: dict[bool, Tensor] = {}
    for fast, frames in resized.items():
        n, channels, height, width = frames.shape
        flat, grid = normalize_patchify(
            frames.permute(1, 0, 2, 3).reshape(channels, n * height, width),
            patch_size=cfg.patch_size,
            mean=cfg.mean,
            std=cfg.std,
        )
        # Stacking frames vertically keeps each frame's patches contiguous and in raster order.
        per_kind[fast] = flat.view(n, (height // cfg.patch_size) * grid[1], *flat.shape[1:])
    position = {False: 0, True: 0}
    patches, grids = [], []
    for frame in plan.frames:
        patches.append(per_kind[frame.is_fast][position[frame.is_fast]])
        position[frame.is_fast] += 1
        grids.append((1, *frame.grid_hw))
    return VideoResult(
        **vars(plan),
        pixel_values=torch.cat(patches),
        grid_thw=torch.tensor(grids, dtype=torch.long),
    )


def inspect_video(path: str, cfg: VideoConfig) -> dict:
    """JSON-serialisable summary of how a video is sampled and tokenised (no pixels are produced)."""
    plan = plan_video(_decode(path, cfg), cfg)
    return {
        "path": os.fspath(path),
        "native_fps": plan.native_fps,
        "total_frames": plan.total_frames,
        "duration_s": plan.duration,
        "num_frames": len(plan.frames),
        "frame_indices": [f.index for f in plan.frames],
        "timestamps": [f.timestamp for f in plan.frames],
        "frame_types": ["fast" if f.is_fast else "slow" for f in plan.frames],
        "num_slow": sum(not f.is_fast for f in plan.frames),
        "num_fast": sum(f.is_fast for f in plan.frames),
        "slow_hw": list(plan.slow_hw),
        "fast_hw": list(plan.fast_hw),
        "slow_grid_hw": [s // cfg.patch_size for s in plan.slow_hw],
        "fast_grid_hw": [s // cfg.patch_size for s in plan.fast_hw],
        "tokens_per_frame": [f.num_tokens for f in plan.frames],
        "total_tokens": plan.num_tokens,
        "token_budget": cfg.video_max_tokens,
    }
