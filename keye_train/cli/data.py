"""`keye-data`: write synthetic shards, inspect a dataset manifest, inspect how a video is sampled."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from keye_train.cli.failure import run_command


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_synth(args: argparse.Namespace) -> int:
    from keye_train.data.synth.shards import SynthConfig, synth_dataset

    cfg = SynthConfig(
        out=Path(args.out),
        samples=args.samples,
        seed=args.seed,
        shards_per_kind=args.shards_per_kind,
        image_min_side=args.image_min_side,
        image_max_side=args.image_max_side,
        video_size=(args.video_width, args.video_height),
        video_fps=args.video_fps,
        video_seconds=args.video_seconds,
    )
    start = time.perf_counter()
    summary = synth_dataset(cfg, progress=_progress)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from keye_train.data.shards.convert.writer import ConvertConfig, convert

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r} must be KEY=VALUE, e.g. --option caption_field=text")
        options[key] = value
    cfg = ConvertConfig(
        format=args.format,
        inputs=[Path(p) for p in args.inputs],
        out=Path(args.out),
        media_root=Path(args.media_root),
        workers=args.workers,
        samples_per_shard=args.samples_per_shard,
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        name=args.name,
        options=options,
    )
    start = time.perf_counter()
    summary = convert(cfg, progress=not args.no_progress)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    bad = sum(summary["bad"].values())
    _progress(
        f"{summary['samples']} of {summary['records']} records converted into {summary['shards']} shards "
        f"({summary['resumed_shards']} already finished); {bad} bad: "
        + (", ".join(f"{r} {n}" for r, n in summary["bad"].items() if n) or "none")
    )
    for reason, examples in summary["examples"].items():
        for example in examples:
            _progress(f"  {reason}: {example}")
    print(json.dumps(summary, indent=1))
    return 0


def _manifest_for(path: Path, kind: str | None):
    from keye_train.data.shards.manifest import DataConfig, SourceConfig, load_manifest

    if path.suffix == ".tar" or kind is not None:
        if kind is None:
            raise ValueError(f"{str(path)!r} is a shard; give its --kind (caption, conversation, ...)")
        return DataConfig(sources=[SourceConfig(name=path.stem, kind=kind, shards=[str(path)], weight=1.0)])
    return load_manifest(path)


def inspect_dataset(args: argparse.Namespace) -> dict:
    """Per source kind: samples, skips, token counts and visual grids of every (or the first N) sample."""
    from keye_train.data.loader.encode import SampleEncoder, SkipCounter, iter_source_samples
    from keye_train.data.media.image import ImageConfig
    from keye_train.data.media.video import VideoConfig
    from keye_train.data.text.tokenizer import load_tokenizer

    cfg = _manifest_for(Path(args.path), args.kind)
    tokenizer_dir = args.tokenizer or cfg.tokenizer
    if tokenizer_dir is None:
        raise ValueError("no tokenizer: the manifest has no `tokenizer` key; pass --tokenizer DIR")
    tok = load_tokenizer(tokenizer_dir)
    encoder = SampleEncoder(
        tok,
        image_cfg=ImageConfig(max_tokens=args.image_max_tokens),
        video_cfg=VideoConfig(video_max_tokens=args.video_max_tokens),
    )
    # Inspection reports every bad sample instead of stopping at the ceiling.
    counter = SkipCounter(max_skip_rate=1.0, log_every=10**9)
    report: dict[str, dict] = {}
    done = 0
    for source in cfg.sources:
        stats = report.setdefault(
            source.kind,
            {
                "samples": 0,
                "tokens": 0,
                "target_tokens": 0,
                "max_tokens": 0,
                "visual_items": 0,
                "grids": Counter(),
                "sources": [],
            },
        )
        stats["sources"].append(source.name)
        for n, sample in enumerate(iter_source_samples(source, encoder=encoder, counter=counter)):
            stats["samples"] += 1
            stats["tokens"] += sample.num_tokens
            stats["target_tokens"] += int((sample.labels != -100).sum())
            stats["max_tokens"] = max(stats["max_tokens"], sample.num_tokens)
            stats["visual_items"] += int(sample.grid_thw.shape[0])
            stats["grids"].update(f"{h}x{w}" for _, h, w in sample.grid_thw.tolist())
            done += 1
            if done % 100 == 0:
                _progress(f"... {done} samples")
            if args.limit and n + 1 >= args.limit:
                break
    for stats in report.values():
        stats["mean_tokens"] = stats["tokens"] / stats["samples"] if stats["samples"] else 0.0
        stats["distinct_grids"] = len(stats["grids"])
        stats["grids"] = dict(stats["grids"].most_common(args.top_grids))
        stats["skipped"] = sum(counter.skipped[s] for s in stats["sources"])
        stats["skip_reasons"] = {
            r: c for s in stats["sources"] for r, c in counter.reasons.get(s, {}).items()
        }
    return {"tokenizer": str(tokenizer_dir), "added_special_tokens": tok.added_tokens, "kinds": report}


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_dataset(args)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"tokenizer: {report['tokenizer']}")
    for kind, s in report["kinds"].items():
        print(
            f"{kind:13s} samples={s['samples']:6d} skipped={s['skipped']:4d} tokens={s['tokens']:9d} "
            f"mean={s['mean_tokens']:8.1f} max={s['max_tokens']:6d} targets={s['target_tokens']:8d} "
            f"visual_items={s['visual_items']:6d} distinct_grids={s['distinct_grids']}"
        )
        if s["grids"]:
            print(f"{'':13s} grids (h x w patches): {s['grids']}")
        if s["skip_reasons"]:
            print(f"{'':13s} skip reasons: {s['skip_reasons']}")
    return 0


def cmd_inspect_video(args: argparse.Namespace) -> int:
    from keye_train.data.media.video import VideoConfig, inspect_video

    if not Path(args.file).exists():
        raise ValueError(f"video file {args.file!r} does not exist")
    info = inspect_video(args.file, VideoConfig(video_max_tokens=args.video_max_tokens))
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"{key:18s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keye-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic shards of every kind, a manifest and a tiny tokenizer")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples", type=int, default=64, help="total samples over all kinds (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards-per-kind", type=int, default=1)
    p.add_argument("--image-min-side", type=int, default=28, help="shortest long side of an image in pixels")
    p.add_argument("--image-max-side", type=int, default=224, help="longest long side of an image in pixels")
    p.add_argument("--video-width", type=int, default=112)
    p.add_argument("--video-height", type=int, default=84)
    p.add_argument("--video-fps", type=int, default=8)
    p.add_argument("--video-seconds", type=float, default=3.0)
    p.set_defaults(func=cmd_synth)

    from keye_train.data.shards.convert.writer import FORMATS

    p = sub.add_parser(
        "convert", help="convert LLaVA, ShareGPT-video, caption, interleaved, text or grounding data"
    )
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="input files (or img2dataset folders / shards)")
    p.add_argument("--media-root", default=".", help="directory that relative image/video paths start from")
    p.add_argument("--out", required=True, help="output directory: shards, indexes, manifest.yaml, reports")
    p.add_argument("--workers", type=int, default=1, help="conversion processes (default 1)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="input records per shard")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for the manifest and exact index counts")
    p.add_argument("--name", default=None, help="source name and shard prefix (default: the format)")
    p.add_argument("--option", action="append", default=[], help="format option KEY=VALUE (docs/data.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="per sample kind: counts, token counts and visual grids")
    p.add_argument("path", help="manifest YAML, a directory holding manifest.yaml, or a .tar shard (--kind)")
    p.add_argument("--kind", default=None, help="source kind when PATH is a single shard")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the manifest's)")
    p.add_argument("--limit", type=int, default=0, help="samples per source at most (0: all)")
    p.add_argument("--image-max-tokens", type=int, default=20480, help="LLM tokens per image at most")
    p.add_argument("--video-max-tokens", type=int, default=65536, help="LLM tokens per video at most")
    p.add_argument("--top-grids", type=int, default=10, help="most common grids listed per kind")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("inspect-video", help="how a video is sampled into slow/fast frames and tokens")
    p.add_argument("file", help="video file")
    p.add_argument("--video-max-tokens", type=int, default=65536, help="LLM tokens per video at most")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect_video)

    from keye_train.cli.data_index import add_subcommands  # index and calibrate

    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"keye-data {args.command}"
    return run_command(lambda: args.func(args), prog=prog, target="--out", error_code=2)


if __name__ == "__main__":
    sys.exit(main())
