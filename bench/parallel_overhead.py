"""CPU step time of each parallel layout relative to one process doing the same work (gloo, 2 ranks).

Each layout runs on 2 ranks with one thread each; its baseline is one process with one thread that does
the same global work (DP: both ranks' batches as gradient accumulation; TP, CP: the one shared batch;
PP: the same 2-row batch in one forward). ratio = layout step time / baseline step time, so 0.5 is
perfect 2-way scaling and values above 1 mean the communication costs more than the split saves (as
expected for a small model on gloo). Layouts whose modules are not importable are skipped with a note.
Usage:
    python bench/parallel_overhead.py [--seq 256] [--steps 5] [--out bench/results/parallel_overhead.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist

from keye_train.distributed.fsdp import FSDPConfig, set_microbatch
from keye_train.distributed.parallel_dims import ParallelDims, shutdown_distributed
from keye_train.distributed.parallelize import ParallelConfig, parallelize
from keye_train.models.configs import KeyeConfig, ProjectorConfig, tiny
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch
from keye_train.train.loss import token_cross_entropy

LAYOUTS = ("dp2_zero1", "dp2_zero2", "dp2_zero3", "tp2", "cp2", "pp2")


def small() -> KeyeConfig:
    """~6M parameters: big enough that compute is visible next to gloo latency, small enough for CPU."""
    base = tiny()
    return dataclasses.replace(
        base,
        vision=dataclasses.replace(base.vision, hidden_size=128, num_heads=4, intermediate_size=512),
        projector=ProjectorConfig(vision_hidden_size=128, text_hidden_size=256),
        language=dataclasses.replace(
            base.language,
            hidden_size=256,
            num_heads=8,
            num_kv_heads=4,
            head_dim=32,
            intermediate_size=768,
            num_layers=4,
            mrope_section=(4, 6, 6),
        ),
    )


def packed_row(cfg: KeyeConfig, *, seed: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Toy batches (61 tokens each) concatenated into one row and padded to seq_len, so every CP slice
    holds visual tokens (a CP rank without any would skip the ViT's backward: see distributed/fsdp.py)."""
    parts = [toy_packed_batch(cfg, seed=1000 * seed + i) for i in range(seq_len // 61)]
    used = sum(p["input_ids"].shape[1] for p in parts)
    pad = seq_len - used
    cu = [parts[0]["cu_seqlens"][:1]]
    offset = 0
    for p in parts:
        cu.append(p["cu_seqlens"][1:] + offset)
        offset += p["input_ids"].shape[1]
    row = {
        "input_ids": torch.cat([p["input_ids"] for p in parts] + [torch.full((1, pad), cfg.pad_token_id)], 1),
        "labels": torch.cat([p["labels"] for p in parts] + [torch.full((1, pad), -100)], 1),
        "position_ids": torch.cat(
            [p["position_ids"] for p in parts] + [torch.arange(pad).expand(3, 1, -1)], 2
        ),
        "cu_seqlens": torch.cat(cu + ([torch.tensor([seq_len])] if pad else [])).to(torch.int32),
        "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
        "grid_thw": torch.cat([p["grid_thw"] for p in parts]),
    }
    return row


def _forward_loss(model, batch, *, count) -> torch.Tensor:
    logits = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
    )
    loss_sum, _ = token_cross_entropy(logits, batch["labels"])
    return loss_sum / count


def _plain_step(model, batches, optimizer, hook=None, count_group=None):
    count = sum((b["labels"] != -100).sum() for b in batches)
    if count_group is not None:
        dist.all_reduce(count, group=count_group)
    optimizer.zero_grad()
    for i, batch in enumerate(batches):
        if hook is not None:
            hook(is_last=i == len(batches) - 1)
        _forward_loss(model, batch, count=count).backward()
    optimizer.step()


def build_step(layout: str, *, rank: int, world: int, seq: int):
    """A zero-argument callable running one optimizer step of `layout` on this rank (world=1: baseline)."""
    cfg = small()
    model = build_model(cfg, seed=0)
    batches = [packed_row(cfg, seed=s, seq_len=seq) for s in range(2)]
    if world == 1:  # the baseline: the same global work in one process
        work = batches if layout.startswith("dp2") else batches[:1]
        if layout == "pp2":
            from keye_train.distributed.packed_rows import stack_packed_rows

            work = [stack_packed_rows(batches)]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return lambda: _plain_step(model, work, optimizer)
    if layout.startswith("dp2"):
        dims = ParallelDims(world_size=world)
        parallelize(
            model,
            dims=dims,
            cfg=ParallelConfig(fsdp=FSDPConfig(zero_stage=int(layout[-1]))),
            precision="fp32",
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        group = dims.submesh("dp_cp").get_group()
        return lambda: _plain_step(
            model,
            [batches[rank]],
            optimizer,
            hook=lambda is_last: set_microbatch(model, is_last=is_last),
            count_group=group,
        )
    if layout == "tp2":
        from keye_train.distributed.tensor_parallel import loss_parallel_context, vocab_parallel_cross_entropy

        dims = ParallelDims(world_size=world, tp=world)
        parallelize(model, dims=dims, cfg=ParallelConfig(), precision="fp32")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = batches[0]

        def tp_step():
            optimizer.zero_grad()
            with loss_parallel_context(True):
                logits = model(
                    batch["input_ids"],
                    position_ids=batch["position_ids"],
                    cu_seqlens=batch["cu_seqlens"],
                    pixel_values=batch["pixel_values"],
                    grid_thw=batch["grid_thw"],
                )
                loss_sum, count = vocab_parallel_cross_entropy(logits, batch["labels"])
                (loss_sum / count).backward()
            optimizer.step()

        return tp_step
    if layout == "cp2":
        from keye_train.distributed.context_parallel import route_visual_to_slice, split_for_context_parallel

        dims = ParallelDims(world_size=world, cp=world)
        parallelize(model, dims=dims, cfg=ParallelConfig(), precision="fp32")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        part = split_for_context_parallel(
            batches[0], cp_rank=rank, cp_size=world, visual_token_ids=model.visual_token_ids
        )

        def cp_step():
            with route_visual_to_slice(model, part["visual_index"]):
                _plain_step(model, [part], optimizer, count_group=dims.submesh("dp_cp").get_group())

        return cp_step
    if layout == "pp2":
        from keye_train.distributed.packed_rows import stack_packed_rows
        from keye_train.distributed.pipeline import build_pipeline

        dims = ParallelDims(world_size=world, pp=world)
        pipeline = build_pipeline(model, dims=dims, schedule="1f1b", microbatches=2)
        owned = list(pipeline.parameters())
        if pipeline.has_first_stage:
            owned += list(model.visual.parameters()) + list(model.mlp_AR.parameters())
        optimizer = torch.optim.AdamW(owned, lr=1e-3)
        batch = stack_packed_rows(batches)
        count = int((batch["labels"] != -100).sum())

        def pp_step():
            optimizer.zero_grad()
            visual = None
            if pipeline.has_first_stage:
                visual = model.encode_visual(batch["pixel_values"], batch["grid_thw"])
            pipeline.step(batch, visual_embeds=visual, num_target_tokens=count)
            optimizer.step()

        return pp_step
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def _worker(rank: int, world: int, port: int, layout: str, seq: int, steps: int, queue) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        step = build_step(layout, rank=rank, world=world, seq=seq)
        times = []
        for _ in range(steps + 1):  # the first step (lazy init, allocations) is a warm-up
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            step()
            if world > 1:
                dist.barrier()
            times.append(time.perf_counter() - start)
        if rank == 0:
            queue.put({"step_s": statistics.median(times[1:])})
    except Exception as exc:  # report, do not hang the parent
        if rank == 0:
            queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        if world > 1:
            shutdown_distributed(barrier=False)


def measure(layout: str, *, world: int, seq: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, layout, seq, steps, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    return result


def _available(layout: str) -> str | None:
    module = {"tp2": "tensor_parallel", "cp2": "context_parallel", "pp2": "pipeline"}.get(layout)
    if module is None:
        return None
    try:
        __import__(f"keye_train.distributed.{module}")
    except ImportError as exc:
        return f"skipped: keye_train.distributed.{module} is not available ({exc})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--out", default="bench/results/parallel_overhead.json")
    args = parser.parse_args()
    rows = []
    for layout in args.layouts:
        note = _available(layout)
        if note:
            rows.append({"layout": layout, "note": note})
        else:
            base = measure(layout, world=1, seq=args.seq, steps=args.steps)
            par = measure(layout, world=2, seq=args.seq, steps=args.steps)
            row = {"layout": layout, "baseline_step_s": base.get("step_s"), "step_s": par.get("step_s")}
            if "error" in base or "error" in par:
                row["note"] = f"failed: {par.get('error') or base.get('error')}"
            else:
                row["ratio"] = round(par["step_s"] / base["step_s"], 3)
            rows.append(row)
        print(json.dumps(rows[-1]))
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per rank",
        "torch": torch.__version__,
        "model": "bench/parallel_overhead.py:small (fp32)",
        "seq_len": args.seq,
        "load_average_at_end": os.getloadavg(),  # the machine is shared: higher load, noisier ratios
        "ratio": "layout step time / one process doing the same work (0.5 = perfect 2-way scaling)",
        "layouts": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
