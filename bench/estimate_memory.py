"""keye-estimate's memory prediction against the measured peak of a training step on CPU.

For the tiny and a small (~58M) model, in fp32 and bf16, one process runs two AdamW steps of one packed
row through the trainer's own pieces (parallelize at world = 1, the chunked loss) and reports its peak
RSS; a bare process (torch and keye_train imported, the batch built, no model) gives the runtime's fixed
overhead, which the estimate counts explicitly (accounting.RUNTIME_OVERHEAD). Each run is its own
process. Usage:
    python bench/estimate_memory.py [--out bench/results/estimate_memory.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource

import torch

from keye_train.distributed.accounting import (
    RUNTIME_OVERHEAD,
    Layout,
    Workload,
    memory_per_rank,
    param_counts,
)
from keye_train.models.configs import KeyeConfig, LanguageConfig, ProjectorConfig, VisionConfig, tiny

SEQ = {"tiny": 256, "small": 1024}


def small() -> KeyeConfig:
    """~58M parameters: a 6-layer 512-wide decoder over a 32K vocabulary (33M of it embeddings and head) and
    a 4-layer 256-wide ViT."""
    vision = VisionConfig(
        hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, num_packing_positions=64
    )
    language = LanguageConfig(
        vocab_size=32000,
        hidden_size=512,
        num_layers=6,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=1536,
        mrope_section=(8, 12, 12),
    )
    projector = ProjectorConfig(vision_hidden_size=256, text_hidden_size=512)
    return KeyeConfig(
        vision=vision,
        projector=projector,
        language=language,
        image_token_id=31995,
        video_token_id=31996,
        vision_start_token_id=31992,
        vision_end_token_id=31993,
        pad_token_id=31990,
    )


MODELS = {"tiny": tiny, "small": small}


def _batch(name: str):
    from keye_train.testing.packed_row import packed_row

    return packed_row(MODELS[name](), seq_len=SEQ[name], image_hw=(16, 16), video_thw=(2, 8, 8))


def _peak_rss() -> int:
    """This process's peak resident set in bytes. VmHWM belongs to the process's own address space; on
    Linux ru_maxrss is carried over from the parent across fork + exec, so a spawned child of a large
    process (a pytest run late in the suite) would report the parent's peak instead of its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run(name: str, mode: str, queue) -> None:
    """mode fp32 | bf16: two training steps of model `name`; runtime: the same imports and batch plus one
    step of a 2-layer MLP in each precision (autograd engine, optimizer and the bf16 kernels loaded), no
    model: the fixed overhead the estimate counts."""
    torch.set_num_threads(1)
    batch = _batch(name)
    from keye_train.distributed.parallel_dims import ParallelDims
    from keye_train.distributed.parallelize import ParallelConfig, parallelize
    from keye_train.distributed.precision import autocast
    from keye_train.models.keye import build_model
    from keye_train.testing.packed_row import row_loss_backward

    if mode == "runtime":
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
        optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-4)
        for precision in ("fp32", "bf16"):
            with autocast(precision, "cpu"):
                x = mlp(torch.randn(2, 4, 16, 64))
                out = torch.nn.functional.scaled_dot_product_attention(x, x, x)
            out.float().square().sum().backward()
            optimizer.step()
    else:
        model = build_model(MODELS[name](), seed=0)
        parallelize(model, dims=ParallelDims(world_size=1), cfg=ParallelConfig(), precision=mode)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):
            row_loss_backward(model, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    queue.put(_peak_rss())


def measure(name: str, precision: str) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(name, precision, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def estimate(name: str, precision: str) -> dict[str, float]:
    cfg, batch = MODELS[name](), _batch(name)
    tokens = batch["input_ids"].numel()
    visual = batch["pixel_values"].shape[0] / cfg.projector.merge_size**2
    work = Workload(seq_len=tokens, visual_fraction=visual / tokens)
    return memory_per_rank(cfg, work, Layout(dp=1, zero=3), precision=precision, device="cpu")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/estimate_memory.json")
    args = parser.parse_args(argv)
    rows = []
    for name in MODELS:
        bare = measure(name, "runtime")
        for precision in ("fp32", "bf16"):
            peak = measure(name, precision)
            est = estimate(name, precision)
            rows.append(
                {
                    "model": name,
                    "params": param_counts(MODELS[name]())["total"],
                    "seq": SEQ[name],
                    "precision": precision,
                    "measured_peak_mib": peak / 2**20,
                    "measured_runtime_overhead_mib": bare / 2**20,
                    "estimate_mib": est["total_no_ac"] / 2**20,
                    "estimate_over_measured": est["total_no_ac"] / peak,
                    "estimate_parts_mib": {k: v / 2**20 for k, v in est.items()},
                }
            )
            print({k: v for k, v in rows[-1].items() if k != "estimate_parts_mib"}, flush=True)
    result = {"runtime_overhead_mib_in_estimate": RUNTIME_OVERHEAD["cpu"] / 2**20, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
