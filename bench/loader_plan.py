"""Planning at scale: one global batch over 8..4,096 DP ranks, with and without binding token capacity.

Reports per rank count: plan_batch time and max/mean against the lower bound max(mean, largest)/mean
(300K samples by default, one microbatch per rank whose capacity is 95% filled ("binding") or 4x the
need ("free")); the loader's per-step planning (StepPlanner.next_step over a GlobalOrder of an
in-memory index: order draws + plan) in microseconds per sample; and the index memory per 1M samples.

Usage: python bench/loader_plan.py [--ranks 8 64 512 4096] [--samples 300000] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
import tracemalloc

import numpy as np

from keye_train.data.plan.balance import PlanItem, plan_batch
from keye_train.data.plan.cost import CostModel

PATCHES_PER_TOKEN = 4


def workload(samples: int, seed: int) -> tuple[list[int], list[float]]:
    """Tokens and costs of a mixed batch: 50% text (log-normal, median 300 tokens), 40% images (16..2,048
    tokens, log-uniform) with a caption, 10% videos (8..32 frames of 32..192 tokens)."""
    rng, model = random.Random(seed), CostModel()
    tokens, costs = [], []
    for _ in range(samples):
        kind = rng.random()
        if kind < 0.5:
            t, frames = int(max(16, rng.lognormvariate(math.log(300), 1.0))), []
        elif kind < 0.9:
            image = int(math.exp(rng.uniform(math.log(16), math.log(2048))))
            t, frames = image + rng.randint(16, 128), [image * PATCHES_PER_TOKEN]
        else:
            per, n = rng.randint(32, 192), rng.randint(8, 32)
            t, frames = n * (per + 6) + rng.randint(16, 128), [per * PATCHES_PER_TOKEN] * n
        tokens.append(min(t, 32768))
        costs.append(model.sample_cost(tokens=tokens[-1], frame_patches=frames))
    return tokens, costs


def bench_plan(ranks: int, samples: int, binding: bool) -> dict:
    tokens, costs = workload(samples, seed=ranks)
    need = math.ceil(sum(tokens) / ranks)
    capacity = max(max(tokens), math.ceil(need / 0.95) if binding else 4 * need)
    items = [PlanItem(index=i, cost=c, tokens=t) for i, (t, c) in enumerate(zip(tokens, costs))]
    start, cpu = time.perf_counter(), time.process_time()
    plan = plan_batch(items, num_ranks=ranks, microbatches=1, max_seq_len=capacity)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = plan.report(items)
    return {
        "ranks": ranks,
        "samples": samples,
        "capacity": "binding (95% full)" if binding else "free (4x)",
        "microbatch_tokens": capacity,
        "planning_s": round(seconds, 3),
        "planning_cpu_s": round(cpu, 3),  # CPU time of this process: what one idle core would take
        "max_over_mean": round(report["max_over_mean"], 5),
        "lower_bound": round(report["lower_bound"], 5),
        "gap_to_bound": round(report["max_over_mean"] / report["lower_bound"] - 1, 5),
        "deferred": report["deferred"],
    }


class _Entry:
    __slots__ = ("error", "key")

    def __init__(self, key: str) -> None:
        self.key, self.error = key, None


def bench_step_planner(ranks: int, samples_per_step: int, steps: int) -> dict:
    """StepPlanner.next_step over a GlobalOrder of 5 sources (an in-memory index, no files)."""
    from keye_train.data.plan.order import GlobalOrder
    from keye_train.data.plan.steps import StepPlanner
    from keye_train.data.plan.tables import _SourceTable
    from keye_train.data.shards.manifest import DataConfig, SourceConfig

    total = samples_per_step * (steps + 2)
    tables, sources = {}, []
    for s in range(5):
        tokens, costs = workload(total // 5, seed=s)
        cfg = SourceConfig(name=f"s{s}", kind="caption", shards=["-"], token_share=0.2)
        sources.append(cfg)
        tables[cfg.name] = _SourceTable(
            config=cfg,
            shard_start=np.asarray([0, len(tokens)], dtype=np.int64),
            entries=[_Entry(f"s{s}/{i}") for i in range(len(tokens))],
            tokens=np.asarray(tokens, dtype=np.int64),
            costs=np.asarray(costs, dtype=np.float64),
        )
    order = GlobalOrder(DataConfig(sources=sources), tables=tables)
    need = sum(int(t.tokens.sum()) for t in tables.values()) / (steps + 2)
    seq = math.ceil(need / ranks / 0.95 * 1.05)
    planner = StepPlanner(order, dp=ranks, microbatches=1, max_seq_len=max(seq, 32768), fill=0.95)
    planner.next_step()  # warm: the epoch's permutations
    start, cpu, taken = time.perf_counter(), time.process_time(), 0
    for _ in range(steps):
        taken += len(planner.next_step().items)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "ranks": ranks,
        "samples_per_step": taken // steps,
        "us_per_sample": round(seconds / taken * 1e6, 2),
        "cpu_us_per_sample": round(cpu / taken * 1e6, 2),
    }


def index_memory_per_million(samples: int = 1_000_000) -> dict:
    """Heap bytes a loading rank holds for the index of `samples` text samples (one shard): the
    planner's in-memory columns and the epoch's permutation, with the sidecar columns memory-mapped
    (tracemalloc counts numpy's allocations, not mapped pages)."""
    import tempfile
    from pathlib import Path

    from keye_train.data.media.image import ImageConfig
    from keye_train.data.media.video import VideoConfig
    from keye_train.data.plan.order import GlobalOrder, build_tables
    from keye_train.data.shards.index import IndexEntry, _header, index_path
    from keye_train.data.shards.manifest import DataConfig, SourceConfig

    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "text-000000.tar"
        shard.write_bytes(b"\0" * 1024)
        rng = np.random.default_rng(0)
        with open(index_path(shard), "w") as f:
            f.write(json.dumps(_header(shard, kind="text", tokenizer=None, samples=samples)) + "\n")
            for i, t in enumerate(rng.integers(16, 4096, samples).tolist()):
                entry = IndexEntry(
                    key=f"{i:09d}", kind="text", offset=512 * i, members={"txt": [512 * i + 512, 64]}
                )
                entry.text_tokens = t
                f.write(json.dumps(entry.to_json()) + "\n")
        cfg = DataConfig(sources=[SourceConfig(name="text", kind="text", shards=[str(shard)], weight=1.0)])
        kwargs = {"image_cfg": ImageConfig(), "video_cfg": VideoConfig(), "cost_model": CostModel()}
        start = time.perf_counter()
        build_tables(cfg, **kwargs)  # writes the sidecar columns once
        built = time.perf_counter() - start
        tracemalloc.start()
        order = GlobalOrder(cfg, tables=build_tables(cfg, **kwargs))
        next(order)  # the epoch's permutation
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        sidecar = sum(p.stat().st_size for p in Path(tmp).glob("*.npy"))
        del order
    return {
        "samples": samples,
        "heap_bytes_per_sample": round(current / samples, 2),
        "heap_MiB_per_1M": round(current / samples * 1e6 / 2**20, 1),
        "heap_GiB_per_100M": round(current / samples * 1e8 / 2**30, 2),
        "mapped_sidecar_bytes_per_sample": round(sidecar / samples, 1),
        "sidecar_build_s_per_1M": round(built / samples * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--samples", type=int, default=300_000)
    parser.add_argument("--step-samples", type=int, default=20_000, help="samples per step, loader planning")
    parser.add_argument("--index-samples", type=int, default=1_000_000, help="samples of the memory test")
    parser.add_argument("--skip-memory", action="store_true", help="skip the index memory measurement")
    parser.add_argument("--out", default="bench/results/loader_plan.json")
    args = parser.parse_args()
    rows = []
    for ranks in args.ranks:
        for binding in (False, True):
            rows.append(bench_plan(ranks, args.samples, binding))
            print(json.dumps(rows[-1]), flush=True)
    loader = []
    for ranks in args.ranks:
        loader.append(bench_step_planner(ranks, args.step_samples, steps=3))
        print(json.dumps(loader[-1]), flush=True)
    memory = {} if args.skip_memory else index_memory_per_million(args.index_samples)
    print(json.dumps(memory))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.skip_memory and os.path.exists(args.out):  # keep the memory measured by an earlier run
        with open(args.out) as f:
            memory = json.load(f).get("index_memory", {})
    with open(args.out, "w") as f:
        json.dump(
            {"plan": rows, "step_planner": loader, "index_memory": memory, "load": os.getloadavg()},
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
