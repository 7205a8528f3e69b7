"""Keye-VL-1.5 processor for transformers (`trust_remote_code=True`), written by keye_train.

The image processor resizes each image so that both sides are multiples of 28 within [min_pixels,
max_pixels] (aspect ratio kept), normalises with mean/std 0.5 and cuts raster-ordered 14x14 patches. The
processor expands every `<|image_pad|>` of the prompt into h*w/4 pads, and every `<|video_pad|>` into the
SlowFast frame layout: per frame `<|frame|>` + timestamp (one decimal) + [`<|fast_start|>`] + pads +
[`<|fast_end|>`]. Videos arrive as lists of frames already sampled and sized by the SlowFast sampler (e.g.
keye-vl-utils), with `timestamps` and `frame_types` (0 slow, 1 fast); frames are only rounded to
multiples of 28.

Standalone: imports numpy, torch, PIL and transformers only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width): multiples of `factor` (Python rounding), scaled into [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {width}x{height} has an aspect ratio above 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class KeyeVL1_5ImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(
        self,
        patch_size: int = 14,
        merge_size: int = 2,
        min_pixels: int = 4 * 28 * 28,
        max_pixels: int = 20480 * 28 * 28,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
        temporal_patch_size: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.temporal_patch_size = temporal_patch_size

    def patchify(self, image, *, min_pixels: int | None = None, max_pixels: int | None = None):
        """One PIL image (or HxWx3 uint8 array) -> ((h*w, 3, p, p) patches, (1, h, w) grid)."""
        from PIL import Image

        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        image = image.convert("RGB")
        factor = self.patch_size * self.merge_size
        height, width = smart_resize(
            image.height,
            image.width,
            factor=factor,
            min_pixels=self.min_pixels if min_pixels is None else min_pixels,
            max_pixels=self.max_pixels if max_pixels is None else max_pixels,
        )
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        # Rescale in float64, then float32 (as the reference processor does): values agree bit for bit.
        scaled = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = torch.from_numpy(scaled).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean)[:, None, None]
        std = torch.tensor(self.image_std)[:, None, None]
        pixels = (pixels - mean) / std
        p = self.patch_size
        h, w = height // p, width // p
        patches = pixels.reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3, p, p)
        return patches, (1, h, w)

    def preprocess(self, images, **kwargs) -> BatchFeature:
        out = [self.patchify(image) for image in images]
        return BatchFeature(
            {
                "pixel_values": torch.cat([p for p, _ in out]),
                "image_grid_thw": torch.tensor([g for _, g in out]),
            }
        )


class KeyeVL1_5Processor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"
    frame_token = "<|frame|>"
    fast_start = "<|fast_start|>"
    fast_end = "<|fast_end|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, text=None, images=None, videos=None, timestamps=None, frame_types=None, **kwargs):
        """text: str or list of str holding one `<|image_pad|>` per image and one `<|video_pad|>` per video.
        videos: list of frame lists; timestamps / frame_types: one list per video (seconds; 0 slow, 1 fast).
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict[str, torch.Tensor] = {}
        merge = self.image_processor.merge_size**2
        image_tokens: list[int] = []
        if images:
            out = self.image_processor.preprocess(images)
            data.update(out)
            image_tokens = [int(t * h * w) // merge for t, h, w in out["image_grid_thw"].tolist()]
        video_layouts: list[str] = []
        if videos:
            patches, grids, counts = [], [], []
            for v, frames in enumerate(videos):
                kinds = frame_types[v] if frame_types is not None else [0] * len(frames)
                stamps = timestamps[v] if timestamps is not None else [0.0] * len(frames)
                layout = ""
                for frame, kind, stamp in zip(frames, kinds, stamps):
                    # Frames come sized by the SlowFast sampler (slow and fast budgets differ): only
                    # rounded to multiples of 28 here, never re-scaled to the image pixel range.
                    frame_patches, grid = self.image_processor.patchify(frame, min_pixels=0, max_pixels=2**62)
                    patches.append(frame_patches)
                    grids.append(grid)
                    pads = self.video_token * (grid[1] * grid[2] // merge)
                    if kind == 1:
                        pads = self.fast_start + pads + self.fast_end
                    layout += f"{self.frame_token}{float(stamp):.1f}{pads}"
                counts.append(len(frames))
                video_layouts.append(layout)
            data["pixel_values_videos"] = torch.cat(patches)
            data["video_grid_thw"] = torch.tensor(grids)
            data["num_frames"] = torch.tensor(counts)
        expanded = []
        next_image = next_video = 0
        for prompt in texts:
            pieces = []
            for chunk in _split_keep(prompt, (self.image_token, self.video_token)):
                if chunk == self.image_token:
                    pieces.append(self.image_token * image_tokens[next_image])
                    next_image += 1
                elif chunk == self.video_token:
                    pieces.append(video_layouts[next_video])
                    next_video += 1
                else:
                    pieces.append(chunk)
            expanded.append("".join(pieces))
        if next_image != len(image_tokens) or next_video != len(video_layouts):
            raise ValueError(
                f"the text holds {next_image} image and {next_video} video placeholders for "
                f"{len(image_tokens)} images and {len(video_layouts)} videos"
            )
        if expanded:
            kwargs.setdefault("return_tensors", "pt")
            kwargs.setdefault("padding", len(expanded) > 1)
            data.update(self.tokenizer(expanded, add_special_tokens=False, **kwargs))
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _split_keep(text: str, markers: tuple[str, ...]) -> list[str]:
    """`text` cut before and after every marker, markers kept as their own pieces."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        marker = next((m for m in markers if text.startswith(m, i)), None)
        if marker is None:
            i += 1
            continue
        if start < i:
            pieces.append(text[start:i])
        pieces.append(marker)
        i += len(marker)
        start = i
    if start < len(text):
        pieces.append(text[start:])
    return pieces


__all__ = ["KeyeVL1_5ImageProcessor", "KeyeVL1_5Processor"]
