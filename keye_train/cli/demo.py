"""`keye-demo`: synthetic shards -> the data pipeline -> packed batches -> a few steps of the tiny model."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from keye_train.data.manifest import load_manifest
from keye_train.data.packing import PackingConfig
from keye_train.data.stream import PackedStream
from keye_train.data.synth import SynthConfig, synth_dataset
from keye_train.data.tokenizer import load_tokenizer
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.train.loss import token_cross_entropy


def model_config_for(tokenizer):
    """The tiny model with its vocabulary and special-token ids taken from the tokenizer."""
    ids = tokenizer.ids
    cfg = tiny(vocab_size=tokenizer.vocab_size)
    return dataclasses.replace(
        cfg,
        image_token_id=ids.image_pad,
        video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start,
        vision_end_token_id=ids.vision_end,
        pad_token_id=ids.endoftext,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=96, help="synthetic samples to write")
    parser.add_argument("--seq", type=int, default=1024, help="packed sequence length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to write the synthetic data (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.out or tmp) / "synthetic"
        summary = synth_dataset(
            SynthConfig(out=data_dir, samples=args.samples, seed=args.seed), progress=print
        )
        tokenizer = load_tokenizer(summary["tokenizer"])
        stream = PackedStream(
            load_manifest(summary["manifest"]),
            tokenizer=tokenizer,
            packing=PackingConfig(max_seq_len=args.seq, pad_token_id=tokenizer.ids.endoftext),
        )
        cfg = model_config_for(tokenizer)
        model = build_model(cfg, seed=args.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        print(f"tiny Keye model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        start, tokens, first_loss = time.perf_counter(), 0, None
        for step in range(1, args.steps + 1):
            batch = stream.next_batch()
            logits = model(
                batch.input_ids,
                position_ids=batch.position_ids,
                cu_seqlens=batch.cu_seqlens,
                pixel_values=batch.pixel_values,
                grid_thw=batch.grid_thw,
            )
            loss_sum, count = token_cross_entropy(logits, batch.labels)
            loss = loss_sum / count.clamp(min=1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tokens += batch.input_ids.numel()
            first_loss = loss.item() if first_loss is None else first_loss
            if step == 1 or step % 5 == 0:
                print(
                    f"step {step:3d}  loss {loss.item():.4f}  samples {len(batch.sample_keys):2d}  "
                    f"visual items {batch.grid_thw.shape[0]:3d}  target tokens {int(count)}"
                )
        elapsed = time.perf_counter() - start
        print(
            f"loss {first_loss:.3f} -> {loss.item():.3f} over {args.steps} steps; "
            f"{tokens / elapsed:.0f} tokens/s"
        )
        print(f"data: epoch {stream.state.epoch}, skips {stream.counter.summary()}")


if __name__ == "__main__":
    main()
