"""Planned imbalance (max/mean per-rank cost) and planning time vs ranks for LPT, KK and equal-count random.

Two capacities per rank count: "free" (--microbatches x --seq, the heavy-tailed batch fills 85%) and
"binding" (one microbatch of --binding-seq tokens filled to 95%, where best fit must work around full
ranks). Usage:
    python bench/balance.py [--ranks 8 64 512 4096] [--microbatches 2] [--seq 131072] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import time

from keye_train.data.plan.balance import plan_batch
from keye_train.testing.workload import heavy_tailed_batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--binding-seq", type=int, default=81920)
    parser.add_argument(
        "--free-max-ranks", type=int, default=512, help="the free case above this is 2M items"
    )
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--seq", type=int, default=131072)
    parser.add_argument("--kk-max-ranks", type=int, default=64, help="KK is O(n k log n): skip it above this")
    parser.add_argument("--out", default="bench/results/balance.json")
    args = parser.parse_args()
    rows = []
    for ranks in args.ranks:
        cases = [("binding", 1, args.binding_seq, 0.95)]
        if ranks <= args.free_max_ranks:
            cases.insert(0, ("free", args.microbatches, args.seq, 0.85))
        for capacity, microbatches, seq, fill in cases:
            items = heavy_tailed_batch(
                num_ranks=ranks, microbatches=microbatches, max_seq_len=seq, fill=fill, seed=ranks
            )
            for method in ["lpt", "random"] + (["kk"] if ranks <= args.kk_max_ranks else []):
                start = time.perf_counter()
                plan = plan_batch(
                    items, num_ranks=ranks, microbatches=microbatches, max_seq_len=seq, method=method
                )
                elapsed = time.perf_counter() - start
                report = plan.report(items)
                rows.append(
                    {
                        "ranks": ranks,
                        "capacity": capacity,
                        "microbatches": microbatches,
                        "max_seq_len": seq,
                        "samples": len(items),
                        "method": method,
                        "planned_max_over_mean": round(report["max_over_mean"], 4),
                        "lower_bound": round(report["lower_bound"], 4),
                        "deferred": report["deferred"],
                        "planning_ms": round(elapsed * 1e3, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"microbatches": args.microbatches, "max_seq_len": args.seq, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
