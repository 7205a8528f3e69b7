"""Data pipeline throughput per CPU core on the synthetic mix, and video decode + SlowFast vs keye-vl-utils:
on the synthetic clips and, side by side, on generated 720p/1080p H.264 clips with scene cuts.

Usage: python bench/data_pipeline.py [--samples 250] [--seed 0] [--clips 1280x720x20,1920x1080x60]
       [--keyint-s 2] [--clip-repeats 5] [--skip-synth] [--out bench/results/data_pipeline.json]

Clips: each side (ours, keye-vl-utils fetch_video, ours plus the final resize) runs --clip-repeats times,
interleaved (rotating which goes first), each time in a fresh process; medians and the median of the
per-round ratios are reported, with the 1-minute load average before and after each round.
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
from keye_train.data.media.video import VideoConfig, decode_and_plan, preprocess_video, resize_video
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


def make_clip(path: Path, *, width: int, height: int, seconds: float, fps: int, keyint: int) -> float:
    """An H.264 clip (x264 superfast: B-frames, a keyframe every `keyint` frames and at scene cuts) of
    textured gradient scenes with a moving square and a hard cut every ~6 s; returns seconds taken."""
    import av
    import numpy as np

    rng = np.random.default_rng(width + int(seconds))
    n = int(seconds * fps)
    cuts = sorted(rng.choice(np.arange(fps, n - fps), size=max(1, int(seconds // 6)), replace=False).tolist())
    bounds = [0, *cuts, n]
    start = time.perf_counter()
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "superfast", "g": str(keyint), "crf": "23"}
        for a, b in zip(bounds, bounds[1:]):
            c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
            scene = (xx[..., None] / width) * c0 + (yy[..., None] / height) * c1
            texture = rng.integers(0, 40, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
            scene = np.clip(scene + texture[:height, :width], 0, 255).astype(np.uint8)
            color, side = rng.integers(0, 255, 3).astype(np.uint8), height // 5
            for i in range(a, b):
                frame = scene.copy()
                x, y = (i - a) * 7 % (width - side), int(height / 3 + height / 4 * np.sin(i / 9))
                frame[y : y + side, x : x + side] = color
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return time.perf_counter() - start


SIDES = ("ours", "keye_vl_utils", "ours_resized")


def measure_clip(which: str, path: str) -> dict:
    """One side in this (fresh) process: wall seconds, CPU seconds (all its threads), and peak resident
    memory above the start. Each side uses its reader's default threads: decord's own (FFmpeg auto),
    ours video.threads=0 (one per CPU available). Libraries are imported before the clock starts (a
    one-time cost of a process, not of a video): PyAV for ours, keye-vl-utils and decord for theirs.

    ours: decode_and_plan, the sampled frames at full size with their types and sizes, which is what
    fetch_video returns; ours_resized: resize_video, that plus the processor's slow/fast resize."""
    import resource

    if which == "keye_vl_utils":
        ref = load_reference()
        import decord  # noqa: F401
    else:
        import av  # noqa: F401
    with open("/proc/self/statm") as f:
        before_kib = int(f.read().split()[1]) * resource.getpagesize() // 1024
    start, cpu = time.perf_counter(), time.process_time()
    if which == "ours":
        _, plan = decode_and_plan(path, VideoConfig(decoder="pyav"))
        n = len(plan.frames)
    elif which == "ours_resized":
        plan, resized = resize_video(path, VideoConfig(decoder="pyav"))
        n = len(plan.frames)
    else:
        frames, _ = ref.fetch_video({"video": path})
        n = int(frames.shape[0])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": round(seconds, 3),
        "cpu_s": round(cpu, 3),
        "peak_mib": round((peak_kib - before_kib) / 1024, 1),
        "frames": n,
    }


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "n/a"


def decode_bound(path: str, wanted: list[int], fps: float) -> dict:
    """The fewest frames any decoder must decode for `wanted` without parsing slice headers: each wanted
    frame, and every reference frame of its GOP decoded before it (any of them may be predicted from).
    Reference frames are found as the frames a decoder skipping non-reference ones still outputs."""
    import av

    from keye_train.data.media.video_seek import packet_map

    with av.open(path) as container:
        stream = container.streams.video[0]
        pmap = packet_map(container, stream, fps)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        start, tb = stream.start_time or 0, float(stream.time_base)
        refs = {round((f.pts - start) * tb * fps) for f in container.decode(stream)}
    needed: set[int] = set()
    gop: list[int] = []  # reference frames of the current GOP so far, in decode order
    for index, key in zip(pmap.index, pmap.keyframe):
        if key:
            gop = []
        if index in wanted:
            needed |= {index, *gop}
        if index in refs:
            gop.append(index)
    return {"reference_frames": len(refs), "must_decode": len(needed)}


def same_frames(path: str, ref) -> dict:
    """Our plan equals fetch_video's, and our decoded frames equal decord's (its reader) bit for bit."""
    import decord
    import numpy as np

    cfg = VideoConfig(decoder="pyav")
    decoded, plan = decode_and_plan(path, cfg)  # what measure_clip times as "ours"
    theirs = decord.VideoReader(path).get_batch(decoded.indices).asnumpy()
    pixels_equal = bool(np.array_equal(decoded.frames.permute(0, 2, 3, 1).numpy(), theirs))
    _, kwargs = ref.fetch_video({"video": path})
    types = [t == 1 for t in kwargs["frame_types"].tolist()]
    plan_equal = types == [f.is_fast for f in plan.frames] and plan.slow_hw == (
        kwargs["height"],
        kwargs["width"],
    )
    return {"decoded_frames_equal_decord": pixels_equal, "plan_equals_fetch_video": bool(plan_equal)}


def bench_clips(specs: list[str], *, keyint_s: float, repeats: int, ref) -> list[dict]:
    import subprocess

    from keye_train.data.media.video_seek import decode_planned

    out = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_clips_"))
    for spec in specs:
        width, height, seconds = (int(v) for v in spec.split("x"))
        path = tmp / f"{width}x{height}_{seconds}s.mp4"
        gen = make_clip(
            path, width=width, height=height, seconds=seconds, fps=30, keyint=round(30 * keyint_s)
        )
        row = {"clip": f"{width}x{height}, {seconds} s, 30 fps, keyframe every {keyint_s} s + scene cuts"}
        row["generate_s"] = round(gen, 1)
        row["loadavg_1min"] = [_loadavg()]
        runs: dict[str, list[dict]] = {which: [] for which in SIDES}
        for r in range(repeats):  # interleaved, rotating which side goes first
            for which in SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]:
                cmd = [sys.executable, __file__, "--measure-clip", which, str(path)]
                result = subprocess.run(cmd, check=True, capture_output=True, text=True)
                runs[which].append(json.loads(result.stdout.strip().splitlines()[-1]))
            row["loadavg_1min"].append(_loadavg())
        for which, got in runs.items():
            row[which] = {
                "seconds_median": statistics.median(g["seconds"] for g in got),
                "cpu_s_median": statistics.median(g["cpu_s"] for g in got),
                "peak_mib_median": statistics.median(g["peak_mib"] for g in got),
                "frames": got[0]["frames"],
                "seconds": [g["seconds"] for g in got],
                "cpu_s": [g["cpu_s"] for g in got],
            }
        theirs = row["keye_vl_utils"]
        for which, key in (("ours", "speedup"), ("ours_resized", "speedup_resized")):
            row[key] = round(theirs["seconds_median"] / row[which]["seconds_median"], 2)
            pairs = [b["seconds"] / a["seconds"] for a, b in zip(runs[which], runs["keye_vl_utils"])]
            row[key + "_paired_median"] = round(statistics.median(pairs), 2)
            row[key.replace("speedup", "cpu_ratio")] = round(
                theirs["cpu_s_median"] / row[which]["cpu_s_median"], 2
            )
        row |= same_frames(str(path), ref)
        import av

        from keye_train.data.media import slowfast

        with av.open(str(path)) as container:
            total, fps = container.streams.video[0].frames, float(container.streams.video[0].average_rate)
        wanted = slowfast.sample_indices(total, slowfast.num_sampled_frames(total, fps, VideoConfig()))
        _, info = decode_planned(av, str(path), wanted=set(wanted), fps=fps, what=spec)
        row["decode_plan"] = info | {"sampled": len(wanted)} | decode_bound(str(path), set(wanted), fps)
        print(json.dumps(row), file=sys.stderr)
        out.append(row)
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
    parser.add_argument(
        "--clips", default="1280x720x20,1920x1080x60", help="WIDTHxHEIGHTxSECONDS,... ('' skips)"
    )
    parser.add_argument("--keyint-s", type=float, default=2.0, help="keyframe interval of the clips, seconds")
    parser.add_argument("--clip-repeats", type=int, default=5, help="fresh-process runs per side per clip")
    parser.add_argument("--skip-synth", action="store_true", help="only the generated clips")
    parser.add_argument("--measure-clip", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_clip:
        torch.set_num_threads(1)
        print(json.dumps(measure_clip(*args.measure_clip)))
        return
    torch.set_num_threads(1)  # per-core numbers: one process, one intra-op thread
    ref = load_reference()
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }
    if args.clips and ref is not None:
        clips = [c for c in args.clips.split(",") if c]
        result["clips_vs_keye_vl_utils"] = bench_clips(
            clips, keyint_s=args.keyint_s, repeats=args.clip_repeats, ref=ref
        )
    if not args.skip_synth:
        data_dir = Path(tempfile.mkdtemp(prefix="bench_data_"))
        synth_dataset(SynthConfig(out=data_dir, samples=args.samples, seed=args.seed))
        result["synth"] = {"samples": args.samples, "seed": args.seed}
        result["per_kind"] = bench_kinds(data_dir, repeats=args.repeats)
        result["video_vs_keye_vl_utils"] = bench_video(data_dir, ref, repeats=args.repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "video_vs_keye_vl_utils"}, indent=1))
    if "video_vs_keye_vl_utils" in result:
        video = result["video_vs_keye_vl_utils"]
        print(json.dumps({k: v for k, v in video.items() if k != "per_video_ms"}, indent=1))


if __name__ == "__main__":
    main()
