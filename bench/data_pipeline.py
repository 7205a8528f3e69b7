"""Data pipeline throughput per CPU core on the synthetic mix, and video decode + SlowFast vs keye-vl-utils.

Usage: python bench/data_pipeline.py [--samples 250] [--seed 0] [--out bench/results/data_pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from keye_train.data.loader.encode import SampleEncoder, SkipCounter
from keye_train.data.media.video import VideoConfig, preprocess_video, resize_video
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.shards.sources import iter_records
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def load_reference():
    """keye_vl_utils.vision_process imported with the parity test's torchvision stand-in (no torchvision)."""
    sys.path.insert(0, str(ROOT / "tests" / "parity"))
    try:
        import test_keye_vl_utils as parity  # the stand-in trick lives there; reused, not duplicated

        return parity._import_reference()
    except BaseException as exc:  # pytest.skip raises a BaseException subclass when it is unavailable
        print(f"keye-vl-utils unavailable, skipping the comparison: {exc}", file=sys.stderr)
        return None
    finally:
        sys.path.pop(0)


def bench_kinds(data_dir: Path, *, repeats: int) -> dict:
    cfg = load_manifest(data_dir)
    encoder = SampleEncoder(load_tokenizer(cfg.tokenizer))
    results = {}
    for source in cfg.sources:
        counter = SkipCounter(max_skip_rate=0.0, min_samples=1)
        on_error = lambda k, r, c=counter, n=source.name: c.skip(n, k, r)
        records = list(iter_records(source, on_error=on_error))
        best = None
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = sum(encoder.encode(r).num_tokens for r in records)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
        results[source.kind] = {
            "samples": len(records),
            "tokens": tokens,
            "seconds": round(best, 4),
            "samples_per_s_per_core": round(len(records) / best, 1),
            "tokens_per_s_per_core": round(tokens / best),
            "mean_tokens": round(tokens / len(records), 1),
        }
        print(f"{source.kind:13s} {results[source.kind]}", file=sys.stderr)
    return results


def bench_video(data_dir: Path, ref, *, repeats: int) -> dict:
    cfg = load_manifest(data_dir)
    video = next(s for s in cfg.sources if s.kind == "video")
    files = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_videos_"))
    for sample in wds.WebDataset(video.shards, shardshuffle=False, empty_check=False):
        path = tmp / f"{sample['__key__']}.mp4"
        path.write_bytes(sample["mp4"])
        files.append(path)
    ours, matched, theirs = [], [], []
    for path in files:
        t_ours = min(_timed(lambda p=path: preprocess_video(str(p), VideoConfig())) for _ in range(repeats))
        ours.append(t_ours)
        # The same work as fetch_video: decode + SlowFast typing + resize, no normalise/patchify.
        matched.append(
            min(_timed(lambda p=path: resize_video(str(p), VideoConfig())) for _ in range(repeats))
        )
        if ref is not None:
            theirs.append(
                min(_timed(lambda p=path: ref.fetch_video({"video": str(p)})) for _ in range(repeats))
            )
    out = {
        "videos": len(files),
        "ours_ms_median": round(1000 * statistics.median(ours), 2),
        "ours_ms_mean": round(1000 * statistics.mean(ours), 2),
        "ours_scope": "decode + SlowFast typing + resize + normalise + patchify (preprocess_video)",
    }
    if theirs:
        out |= {
            "keye_vl_utils_ms_median": round(1000 * statistics.median(theirs), 2),
            "keye_vl_utils_ms_mean": round(1000 * statistics.mean(theirs), 2),
            "keye_vl_utils_scope": "fetch_video: decode + SlowFast typing + resize (no normalise/patchify)",
            "ratio_ours_over_keye_vl_utils": round(statistics.mean(ours) / statistics.mean(theirs), 3),
            "ours_same_scope_ms_mean": round(1000 * statistics.mean(matched), 2),
            "ours_same_scope": "decode + SlowFast typing + resize (resize_video): fetch_video's work",
            "ratio_same_scope_over_keye_vl_utils": round(
                statistics.mean(matched) / statistics.mean(theirs), 3
            ),
            "per_video_ms": [[round(1000 * a, 2), round(1000 * b, 2)] for a, b in zip(ours, theirs)],
        }
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_pipeline.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core numbers: one process, one intra-op thread
    data_dir = Path(tempfile.mkdtemp(prefix="bench_data_"))
    synth_dataset(SynthConfig(out=data_dir, samples=args.samples, seed=args.seed))
    ref = load_reference()
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "synth": {"samples": args.samples, "seed": args.seed},
        "per_kind": bench_kinds(data_dir, repeats=args.repeats),
        "video_vs_keye_vl_utils": bench_video(data_dir, ref, repeats=args.repeats),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "video_vs_keye_vl_utils"}, indent=1))
    print(
        json.dumps(
            {k: v for k, v in result["video_vs_keye_vl_utils"].items() if k != "per_video_ms"}, indent=1
        )
    )


if __name__ == "__main__":
    main()
