"""Pixel patches between ranks as tensors: the uint8 source values when they reproduce the fp32 exactly."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from keye_train.data.media.image import normalize_patchify

PATCH_SHAPE = (3, 14, 14)


def _normalise(x_u8: Tensor, *, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The encoder's own normalisation (normalize_patchify) of uint8 patches (N, 3, P, P)."""
    n, c, p, _ = x_u8.shape
    # normalize_patchify takes a (C, H, W) image: lay the patches side by side in one row of patches.
    chw = x_u8.permute(1, 2, 0, 3).reshape(c, p, n * p)
    out, _ = normalize_patchify(chw, patch_size=p, mean=tuple(mean), std=tuple(std))
    return out


def to_wire(pixels: Tensor, *, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 patches if normalising them again gives `pixels` bit for bit (4x less to send), else fp32.

    Decoded images and frames are uint8 before the encoder rescales and normalises them, so inverting
    the normalisation and rounding recovers them; resampled or synthetic float pixels fail the check and
    travel as they are.
    """
    if pixels.numel() == 0 or pixels.dtype != torch.float32:
        return pixels
    mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    x = ((pixels.to(torch.float64) * std_t + mean_t) * 255).round()
    if x.min() < 0 or x.max() > 255:
        return pixels
    x_u8 = x.to(torch.uint8)
    if torch.equal(_normalise(x_u8, mean=mean, std=std), pixels):
        return x_u8
    return pixels


def from_wire(wire: Tensor, *, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return _normalise(wire, mean=mean, std=std) if wire.dtype == torch.uint8 else wire


def broadcast_pixels(
    pixels: list[Tensor] | None,
    *,
    layout: list[tuple[int, str]],
    src: int,
    group: object,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[Tensor]:
    """The loading rank's per-microbatch pixel tensors on every rank of `group`: one flat broadcast per
    dtype. `layout` ([(patches, "uint8"|"float32")] per microbatch, from the metadata already broadcast)
    gives the receivers their shapes."""
    out: list[Tensor | None] = [None] * len(layout)
    for dtype in (torch.uint8, torch.float32):
        name = str(dtype).removeprefix("torch.")
        members = [i for i, (_, d) in enumerate(layout) if d == name]
        if not members:
            continue
        sizes = [layout[i][0] for i in members]
        if pixels is not None:
            flat = torch.cat([pixels[i].reshape(-1, *PATCH_SHAPE) for i in members]).contiguous()
        else:
            flat = torch.empty(sum(sizes), *PATCH_SHAPE, dtype=dtype)
        dist.broadcast(flat, src=src, group=group)
        for i, part in zip(members, torch.split(flat, sizes)):
            out[i] = part
    return [from_wire(t, mean=mean, std=std) for t in out]  # type: ignore[arg-type]


def wire_layout(wires: list[Tensor]) -> list[tuple[int, str]]:
    return [(int(w.shape[0]), str(w.dtype).removeprefix("torch.")) for w in wires]
