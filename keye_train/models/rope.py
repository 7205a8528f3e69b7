"""Rotary embeddings: 2D RoPE for the ViT, chunked 3D M-RoPE for the decoder, and M-RoPE position ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x: (..., S, H, D); cos/sin broadcastable to it (..., S, 1, D).

    Computed in fp32 like the reference implementations so that bf16 runs keep the same angles.
    """
    out = x.float() * cos + rotate_half(x.float()) * sin
    return out.to(x.dtype)


def inverse_frequencies(dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """The dim/2 frequencies theta^(-2i/dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def vision_rope_cos_sin(
    *, row_ids: Tensor, col_ids: Tensor, head_dim: int, theta: float
) -> tuple[Tensor, Tensor]:
    """2D RoPE for patches: head_dim/2 dims rotate by row, then column frequencies.

    Layout over head_dim is [h-freqs, w-freqs, h-freqs, w-freqs] (rotate-half over the concatenation).
    Returns cos/sin of shape (N, 1, head_dim).
    """
    inv_freq = inverse_frequencies(head_dim // 2, theta, device=row_ids.device)
    angles = torch.cat(
        (row_ids.float()[:, None] * inv_freq[None], col_ids.float()[:, None] * inv_freq[None]), dim=-1
    )
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos(), angles.sin()


def mrope_cos_sin(
    *, position_ids: Tensor, head_dim: int, theta: float, mrope_section: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Chunked M-RoPE. position_ids: (3, B, S) for the T, H, W components.

    The head_dim/2 frequencies are cut into consecutive chunks of mrope_section sizes; chunk c takes its
    angles from component c. Returns cos/sin of shape (B, S, 1, head_dim).
    """
    inv_freq = inverse_frequencies(head_dim, theta, device=position_ids.device)
    angles = position_ids.float()[..., None] * inv_freq  # (3, B, S, head_dim/2)
    chunks = angles.split(list(mrope_section), dim=-1)
    angles = torch.cat([chunk[i] for i, chunk in enumerate(chunks)], dim=-1)
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def mrope_position_ids(
    input_ids: Tensor,
    *,
    grids_hw: Sequence[tuple[int, int]],
    visual_token_ids: Sequence[int],
    merge_size: int = 2,
) -> Tensor:
    """3D position ids of ONE sample (KEYE_SPEC: Language model / Position ids).

    input_ids: (L,). grids_hw: the patch grid (h, w) of every image and every video frame, in order of
    appearance; each consumes h*w/merge_size^2 visual pad tokens. A text token takes the running position
    s on all three components and advances it by one. A visual block placed at s gets T = s, H = s + row,
    W = s + col over its merged grid (h', w'), and the next token starts at s + max(h', w').
    Returns (3, L) int64.
    """
    ids = input_ids.tolist()
    visual = set(visual_token_ids)
    positions = torch.empty(3, len(ids), dtype=torch.long)
    grid_iter = iter(grids_hw)
    s = 0
    i = 0
    while i < len(ids):
        if ids[i] not in visual:
            positions[:, i] = s
            s += 1
            i += 1
            continue
        try:
            h, w = next(grid_iter)
        except StopIteration:
            raise ValueError(
                f"visual pad token at index {i} has no grid left: {len(grids_hw)} grids were given "
                f"for more visual blocks"
            ) from None
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid (h={h}, w={w}) is not divisible by merge_size={merge_size}")
        hm, wm = h // merge_size, w // merge_size
        n = hm * wm
        block = ids[i : i + n]
        if len(block) < n or any(t not in visual for t in block):
            raise ValueError(
                f"grid (h={h}, w={w}) needs {n} consecutive visual pad tokens at index {i}, "
                f"found {sum(1 for _ in _takewhile_visual(block, visual))}"
            )
        rows = torch.arange(hm).repeat_interleave(wm)
        cols = torch.arange(wm).repeat(hm)
        positions[0, i : i + n] = s
        positions[1, i : i + n] = s + rows
        positions[2, i : i + n] = s + cols
        s += max(hm, wm)
        i += n
    leftover = sum(1 for _ in grid_iter)
    if leftover:
        raise ValueError(f"{leftover} grid(s) left over after all visual pad tokens were placed")
    return positions


def _takewhile_visual(block: list[int], visual: set[int]):
    for token in block:
        if token not in visual:
            return
        yield token
