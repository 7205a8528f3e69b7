"""Shard indexing throughput, prediction cost and seek-read vs stream-read time on synthetic shards.

Usage: python bench/loader_index.py [--samples 500] [--out bench/results/loader_index.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from keye_train.data.media.image import ImageConfig
from keye_train.data.media.video import VideoConfig
from keye_train.data.shards.index import build_index, load_index, predict_tokens, read_record
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.shards.sources import iter_raw, parse_raw
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--out", default="bench/results/loader_index.json")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        synth_dataset(SynthConfig(out=Path(tmp), samples=args.samples, seed=0))
        cfg = load_manifest(tmp)
        tok = load_tokenizer(Path(tmp) / "tokenizer")
        for source in cfg.sources:
            shard = source.shards[0]
            start = time.perf_counter()
            build_index(shard, tokenizer=tok, kind=source.kind)
            built = time.perf_counter() - start
            entries = load_index(shard)
            start = time.perf_counter()
            for entry in entries:
                predict_tokens(entry, image_cfg=ImageConfig(), video_cfg=VideoConfig())
            predicted = time.perf_counter() - start
            start = time.perf_counter()
            with open(shard, "rb") as f:
                for entry in entries:
                    read_record(shard, entry, source=source, fileobj=f)
            seeked = time.perf_counter() - start
            start = time.perf_counter()
            for raw in iter_raw(source):
                parse_raw(raw, source=source)
            streamed = time.perf_counter() - start
            n = len(entries)
            rows[source.kind] = {
                "samples": n,
                "shard_mb": round(Path(shard).stat().st_size / 2**20, 2),
                "index_samples_per_s": round(n / built, 1),
                "predict_us_per_sample": round(1e6 * predicted / n, 1),
                "read_record_us_per_sample": round(1e6 * seeked / n, 1),
                "stream_us_per_sample": round(1e6 * streamed / n, 1),
            }
            print(source.kind, rows[source.kind], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"samples": args.samples, "by_kind": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
