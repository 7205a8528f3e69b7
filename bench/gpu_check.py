"""One prepared check of the engine on one CUDA GPU (< 8 min), writing one JSON file.

1. Every attention backend (sdpa, varlen, flex, flash) against the SDPA reference on packed documents,
   forward and backward, in fp32 and bf16 (a backend that cannot run says why).
2. A bf16 training step of a ~2B Keye-shaped model -- SigLIP-so400m ViT (1152 x 27) + Qwen3-1.7B
   decoder (2048 x 28, GQA 16:8, vocab 151,936) -- on one packed 8K row holding an image, video frames
   and text, through the trainer's own pieces (parallelize at world = 1, the chunked loss, AdamW), with
   and without compile and activation checkpointing: tokens/s, MFU and peak memory against
   keye-estimate's prediction.

MFU convention: distributed/accounting.py (`packed_batch_flops`): 6 x matmul weights per token /
patch / merged token (ViT, projector, LLM and lm_head), plus attention 12 x L x h x s per token with the
real packed-sample and frame lengths, no causal discount, recomputation not counted; over the device's
dense bf16 peak (--peak-tflops, default 989 = H100/H200 SXM).

`--smoke` runs the same code on CPU with the tiny model and a 256-token row (a test in the suite, so it
cannot rot); its compiled variants use the aot_eager backend (the same dynamo graphs and AOT autograd,
without inductor's C++ code generation, which costs a minute on a cold CPU cache and is tested against
eager on its own in tests/unit/test_world1_parallelize.py). Usage:
    python bench/gpu_check.py [--smoke] [--out bench/results/gpu_check.json] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import time
import traceback

import torch

from keye_train.distributed.accounting import (
    Layout,
    Workload,
    memory_per_rank,
    packed_batch_flops,
    param_counts,
)
from keye_train.distributed.activation_checkpoint import ActivationCheckpointConfig
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import COMPILE_BACKENDS, ParallelConfig, parallelize
from keye_train.distributed.precision import configure_matmul
from keye_train.models.attention import auto_backend, packed_attention
from keye_train.models.configs import KeyeConfig, LanguageConfig, ProjectorConfig, VisionConfig, tiny
from keye_train.models.keye import build_model
from keye_train.testing.packed_row import packed_row, row_loss_backward

ATTENTION_BACKENDS = ("sdpa", "varlen", "flex", "flash")
TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2}  # max |out - ref| / max |ref| (TF32 / bf16 rounding)


def keye_2b() -> KeyeConfig:
    """SigLIP-so400m ViT + Qwen3-1.7B decoder shapes (untied lm_head, as the Keye model builds it)."""
    vision = VisionConfig(num_packing_positions=1024)  # so400m: 1152 x 27, 16 heads, 4304 MLP
    language = LanguageConfig(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=6144,
        mrope_section=(16, 24, 24),
    )
    projector = ProjectorConfig(vision_hidden_size=vision.hidden_size, text_hidden_size=language.hidden_size)
    return KeyeConfig(vision=vision, projector=projector, language=language)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_attention(device: torch.device, *, tokens: int, heads: int, kv_heads: int, dim: int) -> list[dict]:
    """Forward + backward of each backend vs SDPA on the same packed q/k/v, per dtype."""
    g = torch.Generator().manual_seed(0)
    bounds = sorted(torch.randperm(tokens - 1, generator=g)[:7].add(1).tolist())
    cu = torch.tensor([0, *bounds, tokens], dtype=torch.int32, device=device)
    base = [torch.randn(1, tokens, n, dim, generator=g) for n in (heads, kv_heads, kv_heads)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ref_out = ref_grads = None
        for name in ATTENTION_BACKENDS:
            row = {"backend": name, "dtype": str(dtype).removeprefix("torch.")}
            try:
                backward = not (name == "flex" and device.type == "cpu")  # no flex backward on CPU
                q, k, v = (t.to(device, dtype, copy=True).requires_grad_(backward) for t in base)
                with torch.set_grad_enabled(backward):
                    out = packed_attention(q, k, v, cu_seqlens=cu, causal=True, backend=name)  # warm-up
                    _sync(device)
                    started = time.perf_counter()
                    out = packed_attention(q, k, v, cu_seqlens=cu, causal=True, backend=name)
                    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v)) if backward else None
                _sync(device)
                row["time_ms"] = 1e3 * (time.perf_counter() - started)
                if name == "sdpa":
                    ref_out, ref_grads = out.float(), grads
                scale = ref_out.abs().max().item()
                row["out_max_rel_err"] = (out.float() - ref_out).abs().max().item() / scale
                if grads is not None and ref_grads is not None:
                    row["grad_max_rel_err"] = max(
                        (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                        for a, b in zip(grads, ref_grads)
                    )
                worst = max(row["out_max_rel_err"], row.get("grad_max_rel_err", 0.0))
                row["ok"] = worst <= TOLERANCE[row["dtype"]]
                row["backward"] = backward
            except Exception as exc:  # a backend this machine cannot run: recorded, not fatal
                row["unavailable"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            rows.append(row)
    return rows


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux KiB)


def train_variant(
    cfg: KeyeConfig,
    batch: dict,
    device: torch.device,
    *,
    compile: bool,
    compile_backend: str = "inductor",
    ac: str,
    steps: int,
    peak_tflops: float,
) -> dict:
    """bf16 steps of the model at world = 1 through the trainer's parallelize(), chunked loss and AdamW."""
    torch._dynamo.reset()
    # The default kernel choice of a run (model.attn_backend=auto): torch varlen / compiled flex on CUDA.
    cfg = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, attn_backend="auto"),
        language=dataclasses.replace(cfg.language, attn_backend="auto"),
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(cfg, device=device, seed=0)
    parallel = ParallelConfig(
        compile=compile, compile_backend=compile_backend, ac=ActivationCheckpointConfig(mode=ac)
    )
    parallelize(
        model, dims=ParallelDims(world_size=1, device_type=device.type), cfg=parallel, precision="bf16"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs = {k: v.to(device) for k, v in batch.items()}
    times, losses = [], []
    for step in range(steps + 1):  # step 0 warms up (compilation, allocator)
        _sync(device)
        started = time.perf_counter()
        loss = row_loss_backward(model, inputs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            times.append(time.perf_counter() - started)
        losses.append(loss.item())
    step_s = sorted(times)[len(times) // 2]
    flops = packed_batch_flops(
        cfg, cu_seqlens=batch["cu_seqlens"].tolist(), grid_thw=batch["grid_thw"].tolist()
    )
    tokens = batch["input_ids"].numel()
    patches = batch["pixel_values"].shape[0]
    work = Workload(seq_len=tokens, visual_fraction=patches / cfg.projector.merge_size**2 / tokens)
    estimate = memory_per_rank(
        cfg,
        work,
        Layout(dp=1, zero=3),
        precision="bf16",
        loss_chunk_tokens=model.lm_head.chunk_tokens,
        device=device.type,
    )
    key = "total_full_ac" if ac == "full" else "total_no_ac"
    # CUDA: this variant's peak allocation. CPU (--smoke): the process's peak RSS so far, so only the
    # first variant's comparison is meaningful there (bench/estimate_memory.py measures in fresh processes).
    measured = peak_memory_bytes(device)
    return {
        "compile": compile,
        "ac": ac,
        "attn_backend": auto_backend(device, torch.bfloat16),
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_step": flops,
        "mfu": flops / step_s / (peak_tflops * 1e12),
        "peak_memory_gib": measured / 2**30,
        "estimate_gib": estimate[key] / 2**30,
        "estimate_over_measured": estimate[key] / measured,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: the same code in seconds")
    parser.add_argument("--out", default="bench/results/gpu_check.json")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip later variants past this")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument(
        "--compile-backend", choices=COMPILE_BACKENDS, help="default: inductor, aot_eager with --smoke"
    )
    args = parser.parse_args(argv)
    compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    configure_matmul(device.type)
    if args.smoke:
        cfg, attn = tiny(), dict(tokens=256, heads=4, kv_heads=2, dim=16)
        batch = packed_row(cfg, seq_len=256, image_hw=(8, 8), video_thw=(2, 4, 4))
    else:
        cfg, attn = keye_2b(), dict(tokens=8192, heads=16, kv_heads=8, dim=128)
        # 448 x 448 image (32 x 32 patches = 256 tokens), 8 video frames of 16 x 16 patches (64 tokens each)
        batch = packed_row(cfg, seq_len=8192, image_hw=(32, 32), video_thw=(8, 16, 16))
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "compile_backend": compile_backend,
        "model_params": param_counts(cfg)["total"],
        "row": {"tokens": batch["input_ids"].numel(), "patches": batch["pixel_values"].shape[0]},
        "mfu_convention": __doc__.split("MFU convention: ")[1].split("\n\n")[0].replace("\n", " "),
        "attention": check_attention(device, **attn),
        "training": [],
    }
    for compile, ac in ((False, "none"), (False, "full"), (True, "none"), (True, "full")):
        if time.perf_counter() - started > args.budget_s:
            result["training"].append({"compile": compile, "ac": ac, "skipped": "time budget"})
            continue
        try:
            result["training"].append(
                train_variant(
                    cfg,
                    batch,
                    device,
                    compile=compile,
                    compile_backend=compile_backend,
                    ac=ac,
                    steps=args.steps,
                    peak_tflops=args.peak_tflops,
                )
            )
        except Exception as exc:
            result["training"].append(
                {
                    "compile": compile,
                    "ac": ac,
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                    "trace": traceback.format_exc()[-2000:],
                }
            )
    result["wall_s"] = time.perf_counter() - started
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "mfu_convention"}, indent=2))
    return result


if __name__ == "__main__":
    main()
