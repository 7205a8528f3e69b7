"""Data types shared across the pipeline: visual item plans, encoded samples and packed batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label value of tokens that carry no loss

# Special tokens by name (KEYE_SPEC). Their ids are read from the tokenizer, never hard-coded.
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
FRAME = "<|frame|>"
FAST_START = "<|fast_start|>"
FAST_END = "<|fast_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class FrameSpec:
    """One sampled video frame: where it came from and how it is tokenised."""

    index: int  # frame index in the decoded video
    timestamp: float  # seconds = index / native fps
    is_fast: bool
    grid_hw: tuple[int, int]  # patch grid (h, w), both multiples of the merge size

    @property
    def num_tokens(self) -> int:
        """LLM tokens of this frame (after the 2x2 merge)."""
        return self.grid_hw[0] * self.grid_hw[1] // 4


@dataclass
class EncodedSample:
    """One training sample, tokenised, with its pixels patchified and its 3D positions.

    grid_thw has one row (1, h, w) per image and per video frame, in order of appearance; pixel_values
    holds their patches concatenated in the same order, each (3, patch, patch) in raster order.
    """

    key: str
    source: str
    kind: str  # caption | conversation | interleaved | video | text
    input_ids: Tensor  # (L,) int64
    # labels[i] is the token to predict AT position i (already shifted inside the sample, so packing,
    # context-parallel splits and pipeline stages never shift across sample boundaries); IGNORE_INDEX
    # where no loss, always at the sample's last position.
    labels: Tensor  # (L,) int64
    position_ids: Tensor  # (3, L) int64
    pixel_values: Tensor = field(default_factory=lambda: torch.empty(0, 3, 14, 14))
    grid_thw: Tensor = field(default_factory=lambda: torch.empty(0, 3, dtype=torch.long))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class PackedBatch:
    """Samples packed into one sequence of max_seq_len tokens (batch dimension 1).

    cu_seqlens marks sample boundaries (attention never crosses them); padding at the end forms its
    own segment with labels IGNORE_INDEX.
    """

    input_ids: Tensor  # (1, S)
    labels: Tensor  # (1, S)
    position_ids: Tensor  # (3, 1, S)
    cu_seqlens: Tensor  # (n_segments + 1,) int32
    pixel_values: Tensor  # (N_patches, 3, 14, 14)
    grid_thw: Tensor  # (n_items, 3)
    sample_keys: list[str]

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())
