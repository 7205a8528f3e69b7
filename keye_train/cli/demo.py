"""`keye-demo`: a few training steps of the tiny Keye model on a packed image + video + text batch."""

from __future__ import annotations

import argparse
import time

import torch

from keye_train.data.layout import IGNORE_INDEX
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model, position_ids_for
from keye_train.train.loss import token_cross_entropy


def packed_demo_batch(cfg, *, generator: torch.Generator) -> dict:
    """Three samples in one sequence: an image caption, a 2-frame video, pure text."""
    img, vid = cfg.image_token_id, cfg.video_token_id
    start, end = cfg.vision_start_token_id, cfg.vision_end_token_id

    def text(n: int) -> list[int]:
        return torch.randint(1, 400, (n,), generator=generator).tolist()

    samples = [
        ([start, *[img] * 6, end, *text(12)], [(4, 6)]),  # image 56x84 px -> 4x6 patches -> 6 tokens
        ([start, *text(3), *[vid] * 4, *text(3), *[vid] * 1, end, *text(8)], [(4, 4), (2, 2)]),  # slow + fast
        (text(20), []),
    ]
    ids, labels, positions, grids = [], [], [], []
    for tokens, sample_grids in samples:
        t = torch.tensor(tokens)
        ids.append(t)
        target = torch.cat([t[1:], torch.tensor([IGNORE_INDEX])])
        target[torch.isin(target, torch.tensor([img, vid, start, end]))] = IGNORE_INDEX
        labels.append(target)
        positions.append(position_ids_for(t, grids_hw=sample_grids, cfg=cfg))
        grids += [(1, h, w) for h, w in sample_grids]
    lengths = torch.tensor([len(t) for t in ids])
    grid_thw = torch.tensor(grids)
    num_patches = int((grid_thw[:, 1] * grid_thw[:, 2]).sum())
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(positions, dim=1)[:, None],
        "cu_seqlens": torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
        "pixel_values": torch.randn(num_patches, 3, 14, 14, generator=generator),
        "grid_thw": grid_thw,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = tiny()
    model = build_model(cfg, seed=args.seed)
    batch = packed_demo_batch(cfg, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Keye model: {n_params / 1e6:.2f}M parameters")
    print(
        f"packed batch: {batch['input_ids'].shape[1]} tokens in {len(batch['cu_seqlens']) - 1} samples, "
        f"{batch['grid_thw'].shape[0]} visual items, {batch['pixel_values'].shape[0]} patches"
    )
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        logits = model(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            pixel_values=batch["pixel_values"],
            grid_thw=batch["grid_thw"],
        )
        loss_sum, count = token_cross_entropy(logits, batch["labels"])
        loss = loss_sum / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}  target tokens {int(count)}")
    elapsed = time.perf_counter() - start
    tokens = batch["input_ids"].numel() * args.steps
    print(f"{args.steps} steps in {elapsed:.2f}s ({tokens / elapsed:.0f} tokens/s forward+backward)")


if __name__ == "__main__":
    main()
