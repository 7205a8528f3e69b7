"""Peak memory and time of preprocessing one large JPEG: ours vs the Hugging Face Qwen2-VL processor.

Each measurement runs in a fresh process that decodes the image first, then reports how far the peak
resident set grew above the resident set before preprocessing (ru_maxrss is a high-water mark, so a
fresh process per measurement keeps earlier work out of it).

Usage: python bench/image_memory.py [--width 4000 --height 3000] [--out bench/results/image_memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def measure(which: str, path: str) -> dict:
    import PIL.Image
    import torch

    torch.set_num_threads(1)
    from keye_train.data.media.image import ImageConfig, preprocess_image

    cfg = ImageConfig()
    if which == "hf":
        from transformers import Qwen2VLImageProcessorPil

        proc = Qwen2VLImageProcessorPil(
            image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
        )
    image = PIL.Image.open(path)
    image.load()
    before = _rss_kib()
    start = time.perf_counter()
    if which == "hf":
        out = proc(images=[image], return_tensors="np")
        shape = list(out["pixel_values"].shape)
    else:
        patches, _ = preprocess_image(image, cfg)
        shape = list(patches.shape)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": round(seconds, 3),
        "peak_above_start_mib": round((peak - before) / 1024, 1),
        "output": shape,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side; the median is kept")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "image_memory.json"))
    parser.add_argument("--measure", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.image)))
        return
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (args.height // 16, args.width // 16, 3), dtype=np.uint8)
    picture = PIL.Image.fromarray(small).resize((args.width, args.height), PIL.Image.Resampling.BICUBIC)
    path = Path(tempfile.mkdtemp(prefix="bench_image_")) / "big.jpg"
    picture.save(path, quality=90)
    result = {"command": " ".join(["python", *sys.argv]), "image": [args.width, args.height]}
    for which in ("ours", "hf"):
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--measure", which, "--image", str(path)]
            runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        runs.sort(key=lambda r: r["peak_above_start_mib"])
        result[which] = runs[len(runs) // 2] | {"seconds_all": [r["seconds"] for r in runs]}
        print(which, result[which], file=sys.stderr)
    result["peak_ratio_ours_over_hf"] = round(
        result["ours"]["peak_above_start_mib"] / result["hf"]["peak_above_start_mib"], 3
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
