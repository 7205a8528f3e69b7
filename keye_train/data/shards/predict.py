"""Token and ViT-patch prediction for indexed samples from header sizes (resize and SlowFast rules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from keye_train.data.media import slowfast
from keye_train.data.media.image import ImageConfig
from keye_train.data.media.video import VideoConfig

if TYPE_CHECKING:
    from keye_train.data.shards.index import IndexEntry


VIDEO_SPLITS = ("upper_bound", "all_slow")


def image_patches(width: int, height: int, cfg: ImageConfig) -> int:
    """ViT patches of an image of this size after the smart resize (LLM tokens: / merge_size^2)."""
    out_h, out_w = cfg.resized_hw(width, height)
    return (out_h // cfg.patch_size) * (out_w // cfg.patch_size)


def video_tokens(
    meta: dict, cfg: VideoConfig, *, split: str | int = "upper_bound", count_text: Callable[[str], int] = len
) -> tuple[int, list[int]]:
    """(LLM tokens, ViT patches per frame, slow frames first) of a video from its container metadata.

    Frame count, indices and timestamps follow exactly from the metadata; which frames are fast is
    only known after decoding. split="upper_bound" takes the split (1..n slow frames; frame 0 is always
    slow) with the most LLM tokens, so the prediction is never below the encoder's count; "all_slow"
    assumes no fast frame (can be low by the 2 fast markers per fast frame when fast and slow frames are
    the same size); an int is the known number of slow frames (exact). count_text: tokens of a timestamp
    string ("12.5"); len is exact for Qwen, whose pre-tokenizer splits every digit and the point.
    """
    if split not in VIDEO_SPLITS and not isinstance(split, int):
        raise ValueError(f"video split={split!r} must be one of {VIDEO_SPLITS} or a slow-frame count")
    total, fps = int(meta["frames"]), float(meta["fps"])
    n = slowfast.num_sampled_frames(total, fps, cfg)
    if isinstance(split, int) and not 1 <= split <= n:
        raise ValueError(f"video split={split} slow frames is outside 1..{n} (the sampled frames)")
    indices = slowfast.sample_indices(total, n)
    fixed = sum(1 + count_text(f"{slowfast.frame_timestamp(i, fps):.1f}") for i in indices)  # <|frame|>t
    merge = cfg.merge_size**2
    best: tuple[int, list[int]] | None = None
    candidates = [split] if isinstance(split, int) else [n] if split == "all_slow" else range(1, n + 1)
    for n_slow in candidates:
        sizes = slowfast.frame_sizes(
            int(meta["height"]), int(meta["width"]), is_fast=[False] * n_slow + [True] * (n - n_slow), cfg=cfg
        )
        slow, fast = (
            (h // cfg.patch_size) * (w // cfg.patch_size) for h, w in (sizes.slow_hw, sizes.fast_hw)
        )
        tokens = n_slow * (slow // merge) + (n - n_slow) * (
            fast // merge + 2
        )  # + <|fast_start|>, <|fast_end|>
        if best is None or tokens > best[0]:
            best = (tokens, [slow] * n_slow + [fast] * (n - n_slow))
    assert best is not None
    return fixed + best[0], best[1]


def predict_tokens(
    entry: IndexEntry,
    *,
    image_cfg: ImageConfig,
    video_cfg: VideoConfig,
    video_split: str | int = "upper_bound",
    count_text: Callable[[str], int] | None = None,
) -> tuple[int, list[int]]:
    """(LLM tokens, ViT patches per image/frame) of an indexed sample, without decoding anything.

    Images are exact (smart resize of the header size); text is exact when the index was built with the
    run's tokenizer; videos follow `video_tokens`. ValueError for a sample the encoder would refuse.
    """
    if entry.error is not None:
        raise ValueError(f"sample {entry.key!r} is unusable: {entry.error}")
    patches = [image_patches(w, h, image_cfg) for w, h in entry.images]
    llm = entry.text_tokens + sum(p // image_cfg.merge_size**2 for p in patches)
    for meta in entry.videos:
        tokens, frames = video_tokens(meta, video_cfg, split=video_split, count_text=count_text or len)
        llm += tokens
        patches += frames
    return llm, patches
