"""Measured step time per rank: cost-balanced planning (LPT) vs equal-count assignment, 4 gloo ranks.

Layouts: dp4, or tp2dp2 (two DP replicas of two TP peers: the replica's loading rank reads and
broadcasts, its TP peer receives; the tiny model itself is not tensor-parallelised here, so both peers
compute the replica's rows, which keeps the measure about the data). Each rank gets its planned
microbatches through TopologyAwareLoader (timed: the wait for data) and times the tiny model's forward
and backward on them: CPU time of the rank (one thread), and wall time. No gradient all-reduce, so
waiting never hides imbalance. Per step the ranks' times are gathered and max/mean reported, next to
the planner's predicted max/mean, with the share of the step spent waiting for data. The data is an
uneven synthetic mix (small text samples next to large images and videos). Usage:
    python bench/loader_balance.py [--layout tp2dp2] [--steps 6] [--samples 120] [--max-seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from keye_train.data.loader.planned import TopologyAwareLoader
from keye_train.data.plan.cost import CostModel
from keye_train.data.shards.index import build_index
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.distributed.parallel_dims import ParallelDims, shutdown_distributed
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.train.loss import token_cross_entropy

WORLD = 4
METHODS = {"balanced": "lpt", "equal_count": "random"}


def tiny_cost_model() -> CostModel:
    """FLOP-proportional coefficients of the tiny model (the CostModel defaults describe the 8B)."""
    cfg = tiny()
    model = build_model(cfg, seed=0)
    vit = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual"))
    llm = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual"))
    v, lm = cfg.vision, cfg.language
    return CostModel(
        vit_linear=2 * vit,
        vit_quadratic=4 * v.num_layers * v.hidden_size,
        llm_linear=2 * llm,
        llm_quadratic=4 * lm.num_layers * lm.num_heads * lm.head_dim / 2,
        scale=1e-6,
    )


LAYOUTS = {"dp4": {}, "tp2dp2": {"tp": 2}}


def _rank(rank: int, port: int, data: dict, steps: int, max_seq_len: int, out_dir: str, layout: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    dims = ParallelDims(world_size=WORLD, **LAYOUTS[layout])
    model = build_model(tiny(), seed=0)
    results = {}
    for name, method in METHODS.items():
        loader = TopologyAwareLoader(
            load_manifest(data["manifest"]),
            dims=dims,
            tokenizer=load_tokenizer(data["tokenizer"]),
            max_seq_len=max_seq_len,
            microbatches=2,
            cost_model=tiny_cost_model(),
            prefetch=1,
            plan_method=method,
        )
        rows = []
        for step in range(steps + 1):  # step 0 warms up
            dist.barrier()  # every rank asks for its data together
            waited = time.perf_counter()
            batch = loader.next_step()
            waited = time.perf_counter() - waited
            dist.barrier()  # every rank starts the measured compute together
            started, cpu_started = time.perf_counter(), time.process_time()
            for mb in batch.microbatches:
                logits = model(
                    mb.input_ids,
                    position_ids=mb.position_ids,
                    cu_seqlens=mb.cu_seqlens,
                    pixel_values=mb.pixel_values,
                    grid_thw=mb.grid_thw,
                )
                loss_sum, count = token_cross_entropy(logits, mb.labels)
                (loss_sum / count.clamp(min=1)).backward()
            # CPU time is the primary measure: on a host with fewer cores than ranks, wall time also
            # counts the time a rank waited for a core.
            elapsed = torch.tensor([time.process_time() - cpu_started, time.perf_counter() - started, waited])
            times = [torch.zeros(3) for _ in range(WORLD)]
            dist.all_gather(times, elapsed)
            model.zero_grad(set_to_none=True)
            if step:
                t = [x[0].item() for x in times]
                wall = [x[1].item() for x in times]
                wait = [x[2].item() for x in times]
                r = batch.report
                rows.append(
                    {
                        "rank_step_cpu_s": t,
                        "rank_step_wall_s": wall,
                        "measured_max_over_mean": max(t) / statistics.mean(t),
                        "wall_max_over_mean": max(wall) / statistics.mean(wall),
                        "rank_wait_s": wait,
                        "wait_share": sum(wait) / (sum(wait) + sum(wall)),
                        "planned_max_over_mean": r["max_over_mean"],
                        "lower_bound": r["lower_bound"],
                        "samples": r["samples"],
                    }
                )
        loader.close()
        results[name] = rows
    if rank == 0:
        Path(out_dir, "rows.json").write_text(json.dumps(results))
    shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="tp2dp2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--image-max-side", type=int, default=640)
    parser.add_argument("--out", default="bench/results/loader_balance.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(
            out=Path(tmp) / "data", samples=args.samples, seed=0, image_max_side=args.image_max_side
        )
        data = synth_dataset(cfg)
        for source in load_manifest(data["manifest"]).sources:
            for shard in source.shards:
                build_index(shard, tokenizer=data["tokenizer"])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(
            _rank,
            args=(port, data, args.steps, args.max_seq_len, tmp, args.layout),
            nprocs=WORLD,
            start_method="spawn",
        )
        rows = json.loads(Path(tmp, "rows.json").read_text())
    summary = {
        name: {
            "measured_max_over_mean": statistics.mean(r["measured_max_over_mean"] for r in rs),
            "planned_max_over_mean": statistics.mean(r["planned_max_over_mean"] for r in rs),
            "wall_max_over_mean": statistics.mean(r["wall_max_over_mean"] for r in rs),
            "lower_bound": statistics.mean(r["lower_bound"] for r in rs),
            "slowest_rank_cpu_s": statistics.mean(max(r["rank_step_cpu_s"]) for r in rs),
            "wait_share": statistics.mean(r["wait_share"] for r in rs),
        }
        for name, rs in rows.items()
    }
    report = {
        "bench": "loader_balance",
        "command": f"python bench/loader_balance.py --layout {args.layout} --steps {args.steps} "
        f"--samples {args.samples} "
        f"--max-seq-len {args.max_seq_len} --image-max-side {args.image_max_side}",
        "world": WORLD,
        "layout": args.layout,
        "microbatches": 2,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "summary": summary,
        "steps": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
