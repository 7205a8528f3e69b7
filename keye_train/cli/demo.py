"""`keye-demo`: a few training steps of the tiny Keye model on a packed image + video + text batch."""

from __future__ import annotations

import argparse
import time

import torch

from keye_train.data.toy_batch import toy_packed_batch
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.train.loss import token_cross_entropy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = tiny()
    model = build_model(cfg, seed=args.seed)
    batch = toy_packed_batch(cfg, seed=args.seed)
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
