"""Decode throughput of the synthetic mix: locally vs through 1 and 2 local I/O servers (N workers each).

Usage: python bench/loader.py [--samples 100] [--workers 2] [--repeats 2] [--out bench/results/loader.json]

Every mode decodes the same index-entry requests (servers read the shards by offset, as on a shared
filesystem) from one trainer-side client process; server workers run 1 intra-op thread each. Results are
checked against local decoding (keys and tensors). Server start-up is not timed; each mode gets one
untimed warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from keye_train.data.batch import EncodedSample
from keye_train.data.ioserver.config import DecodeRequest, IOClient, IOServerConfig, decode_many
from keye_train.data.loader.encode import SampleEncoder
from keye_train.data.shards.index import build_index, load_index
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.testing.ioserver_local import LocalServer

ROOT = Path(__file__).resolve().parents[1]


def requests_of(data_dir: Path) -> tuple[list[DecodeRequest], str]:
    manifest = load_manifest(data_dir)
    requests = []
    for source in manifest.sources:
        for shard in source.shards:
            build_index(shard, kind=source.kind)
            for entry in load_index(shard, kind=source.kind):
                requests.append(DecodeRequest(source.name, source.kind, entry.key, shard=shard, entry=entry))
    return requests, manifest.tokenizer


def timed(run, requests: list[DecodeRequest], *, repeats: int) -> tuple[dict, list]:
    run(requests)  # warm-up: lazy imports, codec set-up in every worker
    best, results = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        results = list(run(requests))
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    tokens = sum(r.num_tokens for r in results if isinstance(r, EncodedSample))
    return {
        "samples": len(results),
        "seconds": round(best, 4),
        "samples_per_s": round(len(results) / best, 1),
        "tokens_per_s": round(tokens / best),
    }, results


def same(a: list, b: list) -> bool:
    fields = ("input_ids", "labels", "position_ids", "pixel_values", "grid_thw")
    return [x.key for x in a] == [y.key for y in b] and all(
        type(x) is type(y)
        and (
            not isinstance(x, EncodedSample) or all(torch.equal(getattr(x, f), getattr(y, f)) for f in fields)
        )
        for x, y in zip(a, b)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="decoding processes per server")
    p.add_argument("--max-in-flight", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "loader.json"))
    args = p.parse_args()
    report: dict = {
        "command": "python bench/loader.py " + " ".join(sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads_local": torch.get_num_threads(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],  # other jobs on the host
        },
        "synth": {"samples": args.samples, "seed": args.seed},
        "workers_per_server": args.workers,
        "max_in_flight": args.max_in_flight,
        "modes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        synth_dataset(SynthConfig(out=Path(tmp), samples=args.samples, seed=args.seed))
        requests, tokenizer = requests_of(Path(tmp))
        encoder = SampleEncoder(load_tokenizer(tokenizer))
        local = lambda reqs: decode_many(reqs, config=IOServerConfig(), encoder=encoder)
        default_threads = torch.get_num_threads()
        # Both thread settings: on a small, shared machine intra-op threads can slow decoding down.
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            name = f"local_{threads}_thread{'s' if threads > 1 else ''}"
            report["modes"][name], reference = timed(local, requests, repeats=args.repeats)
            print(name, report["modes"][name], file=sys.stderr)
        torch.set_num_threads(default_threads)
        for n_servers in (1, 2):
            servers = []
            try:
                for _ in range(n_servers):
                    servers.append(LocalServer(tokenizer, workers=args.workers))
                addresses = [s.address for s in servers]
                with IOClient(addresses, encoder=encoder, max_in_flight=args.max_in_flight) as client:
                    stats, results = timed(client.decode, requests, repeats=args.repeats)
                    stats |= {"client": dict(client.stats), "equal_to_local": same(results, reference)}
            finally:
                for s in servers:
                    s.stop()
            name = f"{n_servers}_server{'s' if n_servers > 1 else ''}_x{args.workers}_workers"
            report["modes"][name] = stats
            print(name, stats, file=sys.stderr)
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
