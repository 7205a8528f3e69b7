"""`keye-data index` (shard indexes for cost-aware planning) and `keye-data calibrate` (cost model fit)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- index


def index_one(shard: str, *, tokenizer: str | None, kind: str | None) -> dict:
    """Index one shard; returns a summary (samples, errors by reason, seconds). Runs in a worker."""
    from keye_train.data.shards.index import build_index, load_index

    start = time.perf_counter()
    path = build_index(shard, tokenizer=tokenizer, kind=kind)
    entries = load_index(shard)
    reasons = Counter(e.error.split(":", 1)[0] for e in entries if e.error)
    header = json.loads(path.read_text().split("\n", 1)[0])
    return {
        "shard": shard,
        "index": str(path),
        "samples": len(entries),
        "errors": sum(reasons.values()),
        "error_reasons": dict(reasons),
        "tar_error": header.get("tar_error"),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _jobs(args: argparse.Namespace) -> tuple[list[tuple[str, str | None]], str | None]:
    """(shard, kind) pairs to index and the tokenizer directory."""
    from keye_train.data.shards.manifest import expand_shards, load_manifest

    tokenizer = args.tokenizer
    jobs: list[tuple[str, str | None]] = []
    if args.manifest:
        cfg = load_manifest(args.manifest)
        tokenizer = tokenizer or cfg.tokenizer
        jobs += [(shard, source.kind) for source in cfg.sources for shard in source.shards]
    jobs += [(shard, args.kind) for shard in expand_shards(args.shards)] if args.shards else []
    if not jobs:
        raise ValueError("nothing to index: give shard paths/patterns or --manifest")
    return jobs, tokenizer


def cmd_index(args: argparse.Namespace) -> int:
    jobs, tokenizer = _jobs(args)
    if tokenizer is None:
        _progress("no --tokenizer: text tokens are estimated at 4 bytes per token (not exact)")
    start = time.perf_counter()
    results: list[dict] = []

    def report(result: dict) -> None:
        results.append(result)
        errors = f", {result['errors']} unusable {result['error_reasons']}" if result["errors"] else ""
        tail = f", tar error: {result['tar_error']}" if result["tar_error"] else ""
        _progress(
            f"[{len(results)}/{len(jobs)}] {result['shard']}: {result['samples']} samples{errors}{tail} "
            f"({result['seconds']:.2f}s)"
        )

    if args.workers <= 1 or len(jobs) == 1:
        for shard, kind in jobs:
            report(index_one(shard, tokenizer=tokenizer, kind=kind))
    else:
        # spawn, not fork: the parent may hold torch/OpenMP threads, which a forked child can deadlock on
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(index_one, s, tokenizer=tokenizer, kind=k) for s, k in jobs]
            for future in as_completed(futures):
                report(future.result())
    order = {shard: i for i, (shard, _) in enumerate(jobs)}
    results.sort(key=lambda r: order[r["shard"]])
    summary = {
        "shards": len(results),
        "samples": sum(r["samples"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "tokenizer": tokenizer,
        "seconds": round(time.perf_counter() - start, 3),
        "results": results,
    }
    print(json.dumps(summary, indent=1))
    return 0


# ------------------------------------------------------------------------------------------ calibrate


def _sizes(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}={text!r} must be comma-separated integers") from None
    if len(set(values)) < 2 or min(values) < 1:
        raise ValueError(f"{what}={text!r} needs >= 2 distinct positive values to fit two coefficients")
    return sorted(set(values))


def _timed(fn: Any, *, repeats: int, warmup: int, device: Any) -> float:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)  # interference (other processes, GC) only ever adds time, so the minimum is cleanest


def _vit_pass(model: Any, *, side: int, count: int, device: Any, dtype: Any) -> Any:
    """Forward + backward of ViT and projector over `count` frames of side x side patches, packed."""
    import torch

    patch = model.cfg.vision.patch_size
    grid_thw = torch.tensor([[1, side, side]] * count, device=device)
    pixels = torch.randn(count * side * side, 3, patch, patch, device=device, dtype=dtype)

    def run() -> None:
        model.encode_visual(pixels, grid_thw).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def _llm_pass(model: Any, *, length: int, count: int, device: Any, dtype: Any) -> Any:
    """Forward + backward of decoder, head and loss over `count` samples of `length` tokens, packed."""
    import torch

    cfg = model.cfg.language
    total = length * count
    embeds = torch.randn(1, total, cfg.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(length, device=device).repeat(count).expand(3, 1, total)
    cu_seqlens = torch.arange(0, total + 1, length, device=device, dtype=torch.int32)
    labels = torch.randint(cfg.vocab_size, (total,), device=device)

    def run() -> None:
        hidden = model.model(embeds, position_ids=positions, cu_seqlens=cu_seqlens)
        logits = model.lm_head(hidden).flatten(0, 1).float()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        model.zero_grad(set_to_none=True)

    return run


def measure(args: argparse.Namespace) -> list:
    """Timings of ViT and LLM passes at the requested sizes (extrapolated in depth with --layers)."""
    import torch

    from keye_train.data.plan.cost import Measurement
    from keye_train.models.configs import preset
    from keye_train.models.keye import build_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    full = preset(args.model)
    depths = {"vit": full.vision.num_layers, "llm": full.language.num_layers}
    layers = [None] if args.layers is None else [1, args.layers]
    if args.layers is not None and args.layers < 2:
        raise ValueError(f"--layers={args.layers} must be >= 2 (depth is extrapolated from 1 and N layers)")
    sides, lengths = _sizes(args.vit_sides, "--vit-sides"), _sizes(args.llm_lengths, "--llm-lengths")
    # Two pass sizes per item size (half and full load): equal work alone would make the linear term
    # indistinguishable from the per-pass overhead; the full load keeps every pass about equally long.
    plan = [("vit", side * side, _counts(max(sides) ** 2, side * side)) for side in sides]
    plan += [("llm", length, _counts(max(lengths), length)) for length in lengths]
    timings: dict[tuple[str, int, int, int | None], float] = {}
    for depth in layers:
        cfg = full
        if depth is not None:
            vision = replace(full.vision, num_layers=min(depth, depths["vit"]))
            cfg = replace(full, vision=vision, language=replace(full.language, num_layers=depth))
        model = build_model(cfg, device=device, seed=args.seed).to(dtype)
        for part, size, counts in plan:
            for count in counts:
                if part == "vit":
                    side = int(round(size**0.5))
                    run = _vit_pass(model, side=side, count=count, device=device, dtype=dtype)
                else:
                    run = _llm_pass(model, length=size, count=count, device=device, dtype=dtype)
                seconds = _timed(run, repeats=args.repeats, warmup=args.warmup, device=device)
                timings[part, size, count, depth] = seconds
                _progress(f"{part} depth={depth or 'full'}: {count} x {size}: {seconds:.5f}s")
        del model
    out = []
    for part, size, counts in plan:
        for count in counts:
            if args.layers is None:
                seconds = timings[part, size, count, None]
            else:  # per-layer time from the depth difference; embeddings and head counted once
                n = min(args.layers, depths[part])
                deep, shallow = timings[part, size, count, args.layers], timings[part, size, count, 1]
                seconds = deep + (depths[part] - n) * (deep - shallow) / max(n - 1, 1)
            out.append(Measurement(part=part, size=size, seconds=max(seconds, 0.0), count=count))
    return out


def _counts(top: int, size: int) -> list[int]:
    full = max(1, top // size)
    return [max(1, full // 2), full] if full > 1 else [1, 2]


# A fit whose residuals exceed this fraction of a measurement does not describe the timings (issue 13 saw
# -2365% with zero ViT coefficients).
MAX_RELATIVE_RESIDUAL = 0.5


def fit_warnings(model: Any, residuals: list[dict]) -> list[str]:
    """What makes a fit useless for planning: a part costing nothing, or residuals far off."""
    warnings = []
    for part in ("vit", "llm"):
        if getattr(model, f"{part}_linear") == 0 and getattr(model, f"{part}_quadratic") == 0:
            warnings.append(
                f"the {part} fit is degenerate (linear = quadratic = 0: all time went into the per-pass "
                f"overhead), so the planner would see every {part} item as free; time larger sizes "
                "(--vit-sides/--llm-lengths) or more --repeats"
            )
    worst = max(residuals, key=lambda r: abs(r["residual"]) / r["seconds"] if r["seconds"] else 0.0)
    rel = abs(worst["residual"]) / worst["seconds"] if worst["seconds"] else 0.0
    if rel > MAX_RELATIVE_RESIDUAL:
        warnings.append(
            f"the fit misses {worst['part']} size={worst['size']} by {rel:.0%} of its measured "
            f"{worst['seconds']:.5f}s (limit {MAX_RELATIVE_RESIDUAL:.0%}); the timings are noisy or too short"
        )
    return warnings


def cmd_calibrate(args: argparse.Namespace) -> int:
    from keye_train.config.loader import recipes_dir
    from keye_train.data.plan.cost import Measurement, fit_cost_model, fit_part, fit_residuals

    if args.measurements:
        rows = json.loads(Path(args.measurements).read_text())
        measurements = [Measurement(**row) for row in rows]
    else:
        measurements = measure(args)
    model = fit_cost_model(measurements)
    overhead = {p: fit_part([m for m in measurements if m.part == p])[2] for p in ("vit", "llm")}
    residuals = fit_residuals(model, measurements, overhead=overhead)
    warnings = fit_warnings(model, residuals)
    # An absolute path, printed as such: the default is the repository's recipes/ wherever this runs from.
    out = Path(args.out).absolute() if args.out else recipes_dir() / f"cost_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    fit_path = out.with_suffix(".fit.json")
    fit_path.write_text(
        json.dumps(
            {
                "measurements": [asdict(m) for m in measurements],
                "overhead_s": overhead,
                "residuals": residuals,
                "warnings": warnings,
            },
            indent=1,
        )
        + "\n"
    )
    for row in residuals:
        rel = row["residual"] / row["seconds"] if row["seconds"] else 0.0
        _progress(
            f"{row['part']} size={row['size']:>7} x{row['count']:<4} measured {row['seconds']:.5f}s "
            f"fit {row['predicted']:.5f}s residual {row['residual']:+.5f}s ({rel:+.1%})"
        )
    for warning in warnings:
        _progress(f"keye-data calibrate: warning: {warning}")
    print(
        json.dumps(
            {"cost_model": asdict(model), "overhead_s": overhead, "out": str(out), "fit": str(fit_path)}
            | {"warnings": warnings},
            indent=1,
        )
    )
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Register `index` and `calibrate` on a `keye-data` subparsers object."""
    from keye_train.data.shards.manifest import SOURCE_KINDS

    p = subparsers.add_parser("index", help="write <shard>.idx.jsonl indexes (offsets, sizes, tokens)")
    p.add_argument("shards", nargs="*", help="shard paths, globs or brace patterns (uncompressed tar)")
    p.add_argument("--manifest", help="index every shard of this manifest, with its kinds and tokenizer")
    p.add_argument("--tokenizer", help="tokenizer directory: exact text token counts (else 4 bytes/token)")
    p.add_argument("--kind", choices=SOURCE_KINDS, help="source kind of SHARDS (default: inferred)")
    p.add_argument("--workers", type=int, default=1, help="shards indexed in parallel (processes)")
    p.set_defaults(func=cmd_index)

    c = subparsers.add_parser("calibrate", help="time ViT/LLM passes and fit the CostModel coefficients")
    c.add_argument("--model", choices=("tiny", "keye_8b"), default="tiny")
    c.add_argument(
        "--out",
        help="cost JSON (default: the repository's recipes/cost_<model>.json); fit report beside it",
    )
    c.add_argument("--vit-sides", default="4,8,16,32", help="square patch grids (side in patches) to time")
    c.add_argument("--llm-lengths", default="128,256,512,1024,2048", help="packed sample lengths to time")
    c.add_argument("--layers", type=int, help="time at 1 and N layers and extrapolate to the full depth")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--warmup", type=int, default=1)
    c.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--measurements", help="fit these saved measurements (JSON list) instead of timing")
    c.set_defaults(func=cmd_calibrate)
