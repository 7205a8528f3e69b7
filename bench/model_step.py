"""Forward+backward tokens/s and peak memory of the model stack per config and attention backend.

Each (config, backend) runs in its own process so peak-RSS numbers do not bleed into each other.
On CUDA it also times one 8B decoder layer with sdpa vs flash. Usage:
    python bench/model_step.py [--seq 2048] [--steps 3] [--out bench/results/model_step.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import platform
import resource
import time

import torch

from keye_train.models.configs import KeyeConfig, LanguageConfig, ProjectorConfig, VisionConfig, tiny
from keye_train.models.keye import build_model, position_ids_for


def config_100m() -> KeyeConfig:
    """~140M parameters: a 12-layer 768-wide Qwen3-style decoder and a 6-layer 384-wide ViT."""
    return KeyeConfig(
        vision=VisionConfig(
            hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536, num_packing_positions=64
        ),
        projector=ProjectorConfig(vision_hidden_size=384, text_hidden_size=768),
        language=LanguageConfig(
            vocab_size=32000,
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            num_kv_heads=4,
            head_dim=64,
            intermediate_size=2048,
            mrope_section=(8, 12, 12),
        ),
        image_token_id=31998,
        video_token_id=31999,
        vision_start_token_id=31996,
        vision_end_token_id=31997,
    )


CONFIGS = {"tiny": tiny, "100m": config_100m}


def make_batch(cfg: KeyeConfig, seq: int) -> dict:
    """Packed documents of 512 tokens, each with one 16x16-patch image (64 LLM tokens)."""
    doc, grid = 512, (16, 16)
    n_docs = seq // doc
    pad = cfg.image_token_id
    ids, positions = [], []
    for _ in range(n_docs):
        tokens = torch.randint(1, 200, (doc,))
        tokens[10:74] = pad
        ids.append(tokens)
        positions.append(position_ids_for(tokens, grids_hw=[grid], cfg=cfg))
    return {
        "input_ids": torch.cat(ids)[None],
        "position_ids": torch.cat(positions, dim=1)[:, None],
        "cu_seqlens": torch.arange(0, seq + 1, doc, dtype=torch.int32),
        "pixel_values": torch.randn(n_docs * grid[0] * grid[1], 3, 14, 14),
        "grid_thw": torch.tensor([[1, *grid]] * n_docs),
    }


def run_one(name: str, backend: str, seq: int, steps: int, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    cfg.vision = dataclasses.replace(cfg.vision, attn_backend=backend)
    cfg.language = dataclasses.replace(cfg.language, attn_backend=backend)
    model = build_model(cfg)
    batch = make_batch(cfg, seq)
    train = backend != "flex"  # FlexAttention has no backward on CPU
    timings = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.set_grad_enabled(train):
            logits = model(**batch)
            if train:
                logits.float().logsumexp(-1).mean().backward()
        timings.append(time.perf_counter() - start)
    step_s = sorted(timings[1:])[len(timings[1:]) // 2]  # median after one warm-up step
    queue.put(
        {
            "config": name,
            "backend": backend,
            "mode": "forward+backward" if train else "forward only",
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "seq_len": seq,
            "step_s": round(step_s, 4),
            "tokens_per_s": round(seq / step_s, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    )


def gpu_layer_times() -> list[dict]:
    """One keye_8b decoder layer, bf16, 8K packed tokens: sdpa vs flash (only with CUDA)."""
    from keye_train.models.attention import flash_available
    from keye_train.models.configs import keye_8b
    from keye_train.models.language import Qwen3DecoderLayer
    from keye_train.models.rope import mrope_cos_sin

    results = []
    for backend in ["sdpa"] + (["flash"] if flash_available() else []):
        lcfg = dataclasses.replace(keye_8b().language, attn_backend=backend)
        layer = Qwen3DecoderLayer(lcfg).cuda().bfloat16()
        x = torch.randn(1, 8192, lcfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(8192, device="cuda").expand(3, 1, -1)
        cos, sin = mrope_cos_sin(
            position_ids=pos, head_dim=lcfg.head_dim, theta=lcfg.rope_theta, mrope_section=lcfg.mrope_section
        )
        rope = (cos.bfloat16(), sin.bfloat16())
        cu = torch.arange(0, 8193, 2048, dtype=torch.int32, device="cuda")
        for i in range(6):
            if i == 1:
                torch.cuda.synchronize()
                start = time.perf_counter()
            layer(x, rope=rope, cu_seqlens=cu).sum().backward()
        torch.cuda.synchronize()
        results.append(
            {"backend": backend, "layer_fwd_bwd_ms": round((time.perf_counter() - start) / 5 * 1e3, 2)}
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="bench/results/model_step.json")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for name in CONFIGS:
        for backend in ("sdpa", "flex"):
            queue = ctx.Queue()
            proc = ctx.Process(target=run_one, args=(name, backend, args.seq, args.steps, queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
            print(json.dumps(rows[-1]))
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "cpu": rows,
        "gpu_layer": gpu_layer_times() if torch.cuda.is_available() else "not measured: no CUDA device",
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
