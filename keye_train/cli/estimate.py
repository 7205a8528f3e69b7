"""`keye-estimate`: model FLOPs per step, MFU and per-rank memory of a model under a parallel layout.

Without layout options it prints the two Keye-VL-1.5 training layouts: stage 2 (8K, 64 GPUs, data
parallel ZeRO-2) and stage 3 (128K, ZeRO-1 with context and pipeline parallelism). Any of --seq/--tp/
--pp/--cp/--dp/--zero/--microbatches describes one layout instead (defaults: stage 2's).
"""

from __future__ import annotations

import argparse

from keye_train.distributed.accounting import (
    GIB,
    Layout,
    Workload,
    flops_per_step,
    memory_per_rank,
    mfu,
    param_counts,
    step_tokens,
)
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.pipeline_config import PipelineConfig
from keye_train.distributed.precision import PRECISIONS
from keye_train.models.configs import PRESETS, KeyeConfig, preset
from keye_train.models.lm_head import DEFAULT_CHUNK_TOKENS

CONVENTION = """FLOP convention: 6 x matmul weights per token passed (2 fwd + 4 bwd) -- ViT weights per patch,
projector per merged token, LLM layers + lm_head per text token (lookups, norms, biases excluded) -- plus
attention 12 x L x h x s per token (h = heads x head_dim, s = packed-sample length, ViT: patches per
image/frame), no causal discount, no recomputation."""

PRESET_LAYOUTS = {
    "stage2_8k_dp64_zero2": (Workload(seq_len=8192), Layout(dp=64, zero=2, microbatches=1)),
    "stage3_128k_pp4_cp8_dp2_zero1": (
        Workload(seq_len=131072),
        Layout(pp=4, cp=8, dp=2, zero=1, microbatches=8),
    ),
}


def check_layout(cfg: KeyeConfig, layout: Layout) -> None:
    """The trainer's own checks of a layout against the model (ParallelDims, the pipeline config): an
    estimate for a layout the trainer would refuse is refused with the same message."""
    lm = cfg.language
    dims = ParallelDims(world_size=layout.world, pp=layout.pp, dp_shard=layout.dp, cp=layout.cp, tp=layout.tp)
    dims.validate_for_model(num_layers=lm.num_layers, num_heads=lm.num_heads, num_kv_heads=lm.num_kv_heads)
    if layout.pp > 1:
        PipelineConfig(microbatches=layout.microbatches).validate(pp=layout.pp, num_layers=lm.num_layers)


def report(name: str, cfg: KeyeConfig, workload: Workload, layout: Layout, args: argparse.Namespace) -> str:
    flops = flops_per_step(cfg, workload, layout)
    overhead = None if args.runtime_overhead_gib is None else args.runtime_overhead_gib * GIB
    mem = memory_per_rank(
        cfg,
        workload,
        layout,
        precision=args.precision,
        loss_chunk_tokens=args.loss_chunk_tokens,
        device=args.device,
        runtime_overhead=overhead,
    )
    work = step_tokens(cfg, workload, layout)
    peak = args.peak_tflops * 1e12
    ideal_s = flops["total"] / (layout.world * peak)
    lines = [
        f"== {name}: world={layout.world} (pp={layout.pp} tp={layout.tp} cp={layout.cp} dp={layout.dp}) "
        f"ZeRO-{layout.zero}, {layout.microbatches} micro-batch(es) of {workload.seq_len} tokens per dp rank",
        f"   step: {work.tokens:,} tokens, {work.visual_tokens:,} visual tokens, {work.patches:,} patches",
        "   model FLOPs/step: "
        + ", ".join(f"{k}={v / 1e15:.1f}P" for k, v in flops.items() if k != "total")
        + f"; total={flops['total'] / 1e15:.1f} PFLOP",
        f"   step time at 100% MFU ({args.peak_tflops:g} TFLOP/s per GPU): {ideal_s:.2f} s; "
        f"at 40% MFU: {ideal_s / 0.4:.2f} s",
    ]
    if args.step_time:
        value = mfu(
            flops=flops["total"], step_time_s=args.step_time, world=layout.world, peak_flops_per_gpu=peak
        )
        lines.append(f"   MFU at a measured step time of {args.step_time:g} s: {100 * value:.1f}%")
    lines.append(f"   memory per rank (GiB, most loaded stage; {args.precision}, {args.device}):")
    lines += [f"     {k:<22} {v / GIB:8.2f}" for k, v in mem.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="keye_8b", choices=sorted(PRESETS))
    parser.add_argument("--seq", type=int, help="tokens per micro-batch per dp rank")
    parser.add_argument("--doc-len", type=int, help="mean packed-sample length (default: --seq)")
    parser.add_argument("--visual-fraction", type=float, default=0.5)
    parser.add_argument("--patches-per-item", type=int, default=1024)
    for key in ("tp", "pp", "cp", "dp", "zero", "microbatches"):
        parser.add_argument(f"--{key}", type=int)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM)")
    parser.add_argument("--step-time", type=float, help="measured seconds per step, to print MFU")
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="runtime overhead, kernels")
    parser.add_argument("--loss-chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument(
        "--runtime-overhead-gib", type=float, help="fixed memory of the runtime (default: accounting.py's)"
    )
    args = parser.parse_args(argv)

    cfg = preset(args.model)
    counts = param_counts(cfg)
    print(
        f"{args.model}: {counts['total'] / 1e9:.3f}B parameters (vision {counts['vision'] / 1e6:.1f}M, "
        f"projector {counts['projector'] / 1e6:.1f}M, language {counts['language'] / 1e9:.3f}B)"
    )
    print(CONVENTION)
    keys = ("seq", "tp", "pp", "cp", "dp", "zero", "microbatches")
    if all(getattr(args, k) is None for k in keys):
        layouts = PRESET_LAYOUTS.items()
    else:
        base_work, base = PRESET_LAYOUTS["stage2_8k_dp64_zero2"]
        layout = Layout(**{k: getattr(args, k) or getattr(base, k) for k in keys if k != "seq"})
        layouts = [("custom", (Workload(seq_len=args.seq or base_work.seq_len), layout))]
    for name, (work, layout) in layouts:
        try:
            check_layout(cfg, layout)
        except ValueError as exc:
            raise SystemExit(f"keye-estimate: error: {exc}") from None
        work = Workload(
            seq_len=work.seq_len,
            doc_len=args.doc_len,
            visual_fraction=args.visual_fraction,
            patches_per_item=args.patches_per_item,
        )
        print(report(name, cfg, work, layout, args))


if __name__ == "__main__":
    main()
