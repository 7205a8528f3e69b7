"""Image preprocessing for the ViT: smart resize to multiples of 28, normalisation, raster-order patches."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from torch import Tensor


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_pixel_stats(mean: tuple[float, ...], std: tuple[float, ...], key: str) -> tuple[tuple, tuple]:
    """Validate per-channel mean/std (3 values each, std > 0) and return them as float tuples."""
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    _require(len(mean) == 3, f"{key}.mean={list(mean)} must have 3 values (R, G, B)")
    _require(len(std) == 3 and all(s > 0 for s in std), f"{key}.std={list(std)} must be 3 positive values")
    return mean, std


@dataclass
class ImageConfig:
    """How a still image becomes ViT patches (defaults: keye-vl-utils 1.5.2 and the Keye-VL-1.5 processor)."""

    min_tokens: int = 4  # LLM tokens (28x28 pixels each) at least; keye-vl-utils MIN_TOKENS
    max_tokens: int = 20480  # LLM tokens at most; keye-vl-utils MAX_TOKENS
    patch_size: int = 14  # ViT patch side in pixels (SigLIP patch14)
    merge_size: int = 2  # projector merges merge_size x merge_size patches into one LLM token
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # SigLIP normalisation
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_aspect_ratio: float = 200.0  # keye-vl-utils MAX_RATIO; longer/shorter side above this is refused

    def __post_init__(self) -> None:
        _require(self.patch_size >= 1, f"image.patch_size={self.patch_size} must be >= 1")
        _require(self.merge_size >= 1, f"image.merge_size={self.merge_size} must be >= 1")
        _require(self.min_tokens >= 1, f"image.min_tokens={self.min_tokens} must be >= 1")
        _require(
            self.max_tokens >= self.min_tokens,
            f"image.max_tokens={self.max_tokens} must be >= image.min_tokens={self.min_tokens}",
        )
        _require(self.max_aspect_ratio >= 1, f"image.max_aspect_ratio={self.max_aspect_ratio} must be >= 1")
        self.mean, self.std = check_pixel_stats(self.mean, self.std, "image")

    @property
    def factor(self) -> int:
        """Side in pixels of one LLM token (28 for patch 14 and a 2x2 merge)."""
        return self.patch_size * self.merge_size

    @property
    def min_pixels(self) -> int:
        return self.min_tokens * self.factor**2

    @property
    def max_pixels(self) -> int:
        return self.max_tokens * self.factor**2

    def resized_hw(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after the smart resize: what the encoder produces and the index predicts."""
        return smart_resize(
            height,
            width,
            factor=self.factor,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            max_aspect_ratio=self.max_aspect_ratio,
        )


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int,
    max_pixels: int,
    max_aspect_ratio: float = 200,
) -> tuple[int, int]:
    """Target (height, width), both multiples of `factor`, with min_pixels <= area <= max_pixels (KEYE_SPEC).

    Each side is rounded to the nearest multiple (Python's round, so exact halves go to the even
    multiple); if the area is then too large both sides are scaled down by one factor and floored, if
    too small scaled up and ceiled. Sides never go below `factor`.
    """
    _require(
        height > 0 and width > 0, f"image size {height}x{width} (HxW) is empty; both sides must be positive"
    )
    _require(factor >= 1, f"smart_resize factor={factor} must be >= 1")
    # min_pixels > max_pixels is allowed on purpose: the max wins (the fast-frame cap relies on it)
    _require(
        min_pixels >= 0 and max_pixels > 0,
        f"smart_resize needs min_pixels >= 0 and max_pixels > 0, got {min_pixels} and {max_pixels}",
    )
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise ValueError(
            f"image size {height}x{width} (HxW) has aspect ratio {ratio:.1f}, above the limit of "
            f"{max_aspect_ratio}; crop or pad it first"
        )
    out_h = max(factor, round(height / factor) * factor)
    out_w = max(factor, round(width / factor) * factor)
    if out_h * out_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        out_h = math.floor(height / scale / factor) * factor
        out_w = math.floor(width / scale / factor) * factor
    elif out_h * out_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        out_h = math.ceil(height * scale / factor) * factor
        out_w = math.ceil(width * scale / factor) * factor
    return max(out_h, factor), max(out_w, factor)


def open_image(data: bytes | str | os.PathLike) -> PIL.Image.Image:
    """Decode an image from bytes or a file path, fully loaded; ValueError if it cannot be decoded."""
    what = f"{len(data)} bytes" if isinstance(data, bytes) else repr(os.fspath(data))
    try:
        image = PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image from {what}: {exc}") from exc
    return image


def normalize_patchify(
    pixels_chw: Tensor, *, patch_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Tensor, tuple[int, int]]:
    """uint8 (3, H, W) pixels -> float32 (H/p * W/p, 3, p, p) patches in raster order, and the grid (h, w).

    The reference processor rescales in float64 (x * (1/255)) and casts to float32. A float32 division
    by 255 gives the same float32 for every one of the 256 uint8 values (both are the correctly rounded
    v/255), so values agree with it to the last bit with no float64 intermediate: the only image-sized
    buffers are the uint8 patches and the float32 result, normalised in place.
    """
    assert pixels_chw.dtype == torch.uint8 and pixels_chw.dim() == 3, (pixels_chw.dtype, pixels_chw.shape)
    channels, height, width = pixels_chw.shape
    assert height % patch_size == 0 and width % patch_size == 0, (height, width, patch_size)
    grid_h, grid_w = height // patch_size, width // patch_size
    # Patchify the uint8 pixels first (a 1-byte copy), then normalise contiguous memory: the same
    # element-wise arithmetic, so the values are unchanged, with far less strided float traffic.
    # (c, gh, p, gw, p) -> (gh, gw, c, p, p): row-major over the patch grid
    patches = pixels_chw.reshape(channels, grid_h, patch_size, grid_w, patch_size).permute(1, 3, 0, 2, 4)
    patches = patches.reshape(grid_h * grid_w, channels, patch_size, patch_size)
    x = patches.to(torch.float32)
    del patches
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
    return x.div_(255).sub_(mean_t).div_(std_t), (grid_h, grid_w)


def resize_frames(frames_nchw: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Resize uint8 video frames (N, 3, H, W) with antialiased bilinear, returning uint8.

    The Keye-VL-1.5 processor resizes video frames this way (torch's uint8 kernel, whose rounding
    differs from resizing in float), so slow/fast frames must go through exactly this call.
    """
    assert frames_nchw.dtype == torch.uint8 and frames_nchw.dim() == 4, (frames_nchw.dtype, frames_nchw.shape)
    return torch.nn.functional.interpolate(frames_nchw, list(size_hw), mode="bilinear", antialias=True)


def resize_image_bicubic(image: PIL.Image.Image, size_hw: tuple[int, int]) -> PIL.Image.Image:
    """PIL bicubic resize to (height, width), as keye-vl-utils fetch_image and the Keye image processor do."""
    height, width = size_hw
    return image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Decode (if lazy) and convert to RGB, turning decoder failures and empty images into ValueError."""
    try:
        rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image ({image.format or 'unknown format'}): {exc}") from exc
    width, height = rgb.size
    _require(width > 0 and height > 0, f"image size {height}x{width} (HxW) is empty")
    return rgb


def preprocess_image(image: PIL.Image.Image, cfg: ImageConfig) -> tuple[Tensor, tuple[int, int]]:
    """One image -> (N, 3, p, p) float32 patches in raster order and the patch grid (h, w), both even.

    Matches keye-vl-utils `fetch_image` (RGB conversion, smart resize, PIL bicubic) followed by the
    Keye-VL-1.5 image processor (rescale 1/255, normalise, patchify without further resizing).
    """
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"preprocess_image expects a PIL.Image.Image, got {type(image).__name__}")
    rgb = to_rgb(image)
    resized = resize_image_bicubic(rgb, cfg.resized_hw(*rgb.size))
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)
    del resized  # the uint8 pixels are all that is needed now; keep the peak low
    return normalize_patchify(pixels, patch_size=cfg.patch_size, mean=cfg.mean, std=cfg.std)
