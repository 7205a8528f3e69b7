"""One packed row of a chosen length holding an image, video frames and text (benchmarks, estimates), and
the forward + backward of such a batch through the trainer's chunked loss (benchmarks and tests)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from keye_train.models.configs import KeyeConfig
from keye_train.models.keye import position_ids_for


def packed_row(cfg: KeyeConfig, *, seq_len: int, image_hw: tuple[int, int], video_thw: tuple[int, int, int]):
    """One packed row: an image sample, a video sample (frames), and text filling it to seq_len."""
    g = torch.Generator().manual_seed(0)
    merge = cfg.projector.merge_size
    img, vid = cfg.image_token_id, cfg.video_token_id
    start, end = cfg.vision_start_token_id, cfg.vision_end_token_id
    text_vocab = min(cfg.language.vocab_size, start)

    def text(n: int) -> list[int]:
        return torch.randint(1, text_vocab, (n,), generator=g).tolist()

    h, w = image_hw
    t, vh, vw = video_thw
    image_tokens = h * w // merge**2
    frame_tokens = vh * vw // merge**2
    video = [start]
    for _ in range(t):
        video += [vid] * frame_tokens
    video += [end]
    samples = [([start, *[img] * image_tokens, end, *text(32)], [(h, w)]), (video + text(32), [(vh, vw)] * t)]
    used = sum(len(s) for s, _ in samples)
    samples.append((text(seq_len - used), []))
    ids, labels, positions, lengths = [], [], [], []
    for tokens, grids in samples:
        x = torch.tensor(tokens)
        target = torch.cat([x[1:], torch.tensor([-100])])
        target[torch.isin(target, torch.tensor([img, vid, start, end]))] = -100
        ids.append(x)
        labels.append(target)
        positions.append(position_ids_for(x, grids_hw=grids, cfg=cfg))
        lengths.append(len(tokens))
    grid_thw = torch.tensor([[1, h, w], *[[1, vh, vw]] * t])
    patches = int((grid_thw[:, 1] * grid_thw[:, 2]).sum())
    patch = cfg.vision.patch_size
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions, dim=1)[:, None],
        "cu_seqlens": torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32),
        "pixel_values": torch.randn(patches, 3, patch, patch, generator=g),
        "grid_thw": grid_thw,
    }


def row_loss_backward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Forward of a packed batch (a `packed_row` or `toy_packed_batch`, already on the model's device)
    through `model(..., labels=...)` -- the chunked LM-head loss the trainer computes, no whole logits --
    and backward of its mean over the target tokens. Returns that mean loss, detached.

    One place for the one-row step of the memory and GPU benches and the world-1 / TP tests, so they
    measure and compare the same computation; the caller owns the optimizer, the loss context (TP's
    loss_parallel) and the timing.
    """
    loss_sum, count = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
        labels=batch["labels"],
    )
    loss = loss_sum / count
    loss.backward()
    return loss.detach()
