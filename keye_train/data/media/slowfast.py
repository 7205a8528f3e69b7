"""SlowFast video planning: fps sampling, slow/fast frame typing by HSV patch similarity, token budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from keye_train.data.media.image import resize_frames, smart_resize
from keye_train.data.media.threads import chunks, ordered_map

if TYPE_CHECKING:
    from keye_train.data.media.video import VideoConfig

try:  # optional: ~100x faster HSV conversion, bit-identical to the numpy fallback below
    import cv2
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None


def num_sampled_frames(total_frames: int, native_fps: float, cfg: VideoConfig) -> int:
    """How many frames to sample: floor(duration * min(fps, native fps)), capped by the frame limit.

    Never below 1 for a non-empty video: keye-vl-utils would produce 0 frames (and then fail) for
    clips shorter than one sampling interval.
    """
    fps = min(cfg.fps, native_fps)
    wanted = int(total_frames / native_fps * fps)
    return max(1, min(wanted, cfg.frame_cap))


def sample_indices(total_frames: int, count: int) -> list[int]:
    """`count` frame indices evenly spread over [0, total_frames - 1], rounded half to even.

    torch.linspace in float32 is used on purpose: its values (and so ties at .5) are what the reference
    rounds, and float64 would pick a different frame in rare cases.
    """
    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def frame_timestamp(index: int, native_fps: float) -> float:
    """Seconds of frame `index`, computed as (1 / fps) * index and stored in float32 like the reference.

    The prompt prints it with one decimal, so the float32 value decides the rounding at ties.
    """
    return float(np.float32((1.0 / native_fps) * index))


_LEVELS = np.arange(256, dtype=np.float64)
with np.errstate(divide="ignore"):
    # OpenCV's fixed-point (12 fractional bits) reciprocal tables for 8-bit RGB->HSV, H in [0, 180)
    _SAT_DIV = np.where(_LEVELS > 0, np.rint(255 * 4096 / _LEVELS), 0).astype(np.int32)
    _HUE_DIV = np.where(_LEVELS > 0, np.rint(180 * 4096 / (6 * _LEVELS)), 0).astype(np.int32)


def rgb_to_hsv_u8(rgb_hwc: np.ndarray) -> np.ndarray:
    """8-bit RGB (H, W, 3) -> 8-bit HSV exactly as OpenCV's COLOR_RGB2HSV (H in [0, 180))."""
    rgb_hwc = np.ascontiguousarray(rgb_hwc, dtype=np.uint8)
    if cv2 is not None:
        return cv2.cvtColor(rgb_hwc, cv2.COLOR_RGB2HSV)
    x = rgb_hwc.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    delta = v - np.minimum(np.minimum(r, g), b)
    s = (delta * _SAT_DIV[v] + 2048) >> 12
    # the hue sector is chosen by which channel holds the max, red first, then green
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * delta, r - g + 4 * delta))
    h = (h * _HUE_DIV[delta] + 2048) >> 12
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def unit_patches(frame_chw: Tensor, *, patch: int, eps: float) -> tuple[Tensor, Tensor]:
    """uint8 RGB frame -> (L2-normalised HSV patch vectors (h, w, 3*p*p), their norms (h, w)).

    Vectors are laid out channel-major inside a patch and the norm carries +eps, so the float32
    cosines equal the reference's bit for bit (comparisons against the thresholds are exact).
    """
    hsv = torch.from_numpy(rgb_to_hsv_u8(frame_chw.permute(1, 2, 0).numpy())).permute(2, 0, 1).float()
    channels, height, width = hsv.shape
    vec = hsv.reshape(channels, height // patch, patch, width // patch, patch).permute(1, 3, 0, 2, 4)
    vec = vec.reshape(height // patch, width // patch, channels * patch * patch)
    norm = torch.norm(vec, p=2, dim=-1, keepdim=True) + eps
    return vec / norm, norm.squeeze(-1)


def patch_similarity(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], cfg: VideoConfig) -> float:
    """Fraction of patches whose HSV cosine exceeds the patch threshold, ignoring patches blank in both.

    Two frames with only blank patches count as identical (1.0); the reference gets NaN there, which
    also never makes a new slow frame.
    """
    (unit_a, norm_a), (unit_b, norm_b) = a, b
    cosine = (unit_a * unit_b).sum(dim=-1)
    informative = ~((norm_a < cfg.blank_patch_norm) & (norm_b < cfg.blank_patch_norm))
    if not bool(informative.any()):
        return 1.0
    return (cosine[informative] > cfg.patch_similarity_threshold).float().mean().item()


def similarity_size(height: int, width: int, cfg: VideoConfig) -> tuple[int, int]:
    """Size at which frames are compared: the frame resized to at most `similarity_max_tokens` tokens."""
    return smart_resize(
        height,
        width,
        factor=cfg.factor,
        min_pixels=cfg.similarity_min_tokens * cfg.factor**2,
        max_pixels=cfg.similarity_max_tokens * cfg.factor**2,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )


def classify_frames(frames_nchw: Tensor, cfg: VideoConfig, *, threads: int = 1) -> list[bool]:
    """is_fast per frame: frame 0 is slow; a frame below `min_frame_similarity` to the last slow frame
    starts a new slow frame, any other is fast. `threads`: frames resized and turned into HSV patches
    at once (each frame on its own either way: the same values)."""
    height, width = frames_nchw.shape[-2:]
    size = similarity_size(height, width, cfg)
    is_fast = [False]
    key = None
    patch = cfg.similarity_patch_size

    def prepare(part: range) -> list[tuple[Tensor, Tensor]]:
        # comparison frames are at most similarity_max_tokens (256 x 28 x 28 px) each
        small_frames = resize_frames(frames_nchw[part.start : part.stop], size)
        return [unit_patches(small, patch=patch, eps=cfg.similarity_eps) for small in small_frames]

    # frames are prepared a few at a time (not all held at once) and compared in order
    parts = chunks(frames_nchw.shape[0], max(1, -(-frames_nchw.shape[0] // 4)))
    prepared = (p for ps in ordered_map(prepare, parts, threads) for p in ps)
    for current in prepared:
        if key is None:
            key = current
            continue
        fast = not patch_similarity(key, current, cfg) < cfg.min_frame_similarity
        is_fast.append(fast)
        if not fast:
            key = current
    return is_fast


def _budget_pixels(slow_tokens: int, *, n_slow: int, n_fast: int, cfg: VideoConfig) -> int:
    fast_tokens = max(int(cfg.fast_token_ratio * slow_tokens), cfg.min_tokens_per_frame)
    return (n_slow * slow_tokens + n_fast * fast_tokens) * cfg.factor**2


def slow_token_limit(*, n_slow: int, n_fast: int, cfg: VideoConfig) -> int:
    """Token cap handed to the slow-frame resize, from a binary search over [min, max] tokens per frame.

    The released search (default) returns the smallest count whose total exceeds the budget, i.e. one
    more than the largest count that fits (the resize floors below it), or the max when all fit; with
    `strict_token_budget` it returns the largest count that fits (never below the minimum).
    """
    budget = cfg.video_max_tokens * cfg.factor**2
    lo, hi = cfg.min_tokens_per_frame, cfg.max_tokens_per_frame
    while lo < hi:
        mid = (lo + hi) // 2
        if _budget_pixels(mid, n_slow=n_slow, n_fast=n_fast, cfg=cfg) > budget:
            hi = mid
        else:
            lo = mid + 1
    if cfg.strict_token_budget and _budget_pixels(lo, n_slow=n_slow, n_fast=n_fast, cfg=cfg) > budget:
        lo = max(cfg.min_tokens_per_frame, lo - 1)
    return lo


@dataclass(frozen=True)
class FrameSizes:
    """Pixel sizes (h, w) of slow and fast frames, both multiples of the token side (28)."""

    slow_hw: tuple[int, int]
    fast_hw: tuple[int, int]


def frame_sizes(height: int, width: int, *, is_fast: list[bool], cfg: VideoConfig) -> FrameSizes:
    """Slow and fast frame sizes for a video of native size (height, width) and these frame types."""
    n_fast = sum(is_fast)
    n_slow = len(is_fast) - n_fast
    area = cfg.factor**2
    min_pixels = cfg.min_tokens_per_frame * area
    slow_hw = smart_resize(
        height,
        width,
        factor=cfg.factor,
        min_pixels=min_pixels,
        max_pixels=slow_token_limit(n_slow=n_slow, n_fast=n_fast, cfg=cfg) * area,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )
    # the ratio applies to the slow frame's actual tokens; float product then int, as released
    slow_tokens = slow_hw[0] * slow_hw[1] / area
    fast_max = max(int(slow_tokens * cfg.fast_token_ratio), cfg.fast_min_tokens) * area
    fast_hw = smart_resize(
        height,
        width,
        factor=cfg.factor,
        min_pixels=min_pixels,
        max_pixels=fast_max,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )
    return FrameSizes(slow_hw=slow_hw, fast_hw=fast_hw)


def tokens_of(size_hw: tuple[int, int], factor: int) -> int:
    """LLM tokens of a frame of this pixel size."""
    return math.prod(size_hw) // factor**2
