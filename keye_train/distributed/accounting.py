"""Model FLOPs per step (ViT included), MFU, and a per-rank memory estimate for a parallel layout.

FLOP convention (printed by `keye-estimate`):
- Dense: 6 FLOPs per matmul weight per token it passes through (2 forward, 4 backward). Counted weights:
  ViT per patch = patch embedding + every encoder layer's q/k/v/out/fc1/fc2; projector per merged token =
  linear_1 + linear_2; LLM per token = every decoder layer's q/k/v/o/gate/up/down + lm_head. Embedding
  and position-table lookups, norms and biases are not matmuls and are left out (< 0.1%); so is the
  SigLIP pooling head, which VLM training never runs.
- Attention: 12 * L * h * s per token, h = query heads x head_dim, s = the length of the packed sample the
  token belongs to (attention never crosses samples), no causal discount; i.e. QK^T and AV cost
  2 * 2 * s * h forward per token per layer, x3 for forward+backward. ViT: 12 * L_v * d_v * s_frame per
  patch, s_frame = patches of its image or frame (bidirectional).
- Activation-checkpoint recomputation is not model FLOPs (MFU convention), so it is not counted.

Memory: bytes per rank of the most loaded pipeline stage, for FSDP2 with bf16 compute, fp32 sharded
parameters, gradients and AdamW states (see distributed/fsdp.py for the ZeRO mapping), and the
activations autograd keeps in this code base's layers (tensor lists in `_layer_activation_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from keye_train.models.configs import KeyeConfig

GIB = 1024**3


@dataclass
class Layout:
    """LLM parallel degrees (dp = dp_shard, no HSDP replication) and training settings of one rank."""

    pp: int = 1
    tp: int = 1
    cp: int = 1
    dp: int = 1
    zero: int = 2
    microbatches: int = 1  # micro-batches per optimizer step (gradient accumulation / pipeline)

    def __post_init__(self) -> None:
        for key in ("pp", "tp", "cp", "dp", "microbatches"):
            if getattr(self, key) < 1:
                raise ValueError(f"layout.{key}={getattr(self, key)} must be >= 1")
        if self.zero not in (1, 2, 3):
            raise ValueError(f"layout.zero={self.zero} must be 1, 2 or 3")

    @property
    def world(self) -> int:
        return self.pp * self.tp * self.cp * self.dp


@dataclass
class Workload:
    """What one LLM data-parallel rank consumes per micro-batch: one packed sequence."""

    seq_len: int = 8192
    doc_len: int | None = None  # mean packed-sample length; None = one sample fills the sequence
    visual_fraction: float = 0.5  # share of LLM tokens that are merged visual tokens
    patches_per_item: int = 1024  # patches per image or frame (1024 = 448 x 448 px)

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"workload.seq_len={self.seq_len} must be >= 1")
        if self.doc_len is not None and not 1 <= self.doc_len <= self.seq_len:
            raise ValueError(f"workload.doc_len={self.doc_len} must be within 1..seq_len={self.seq_len}")
        if not 0.0 <= self.visual_fraction <= 1.0:
            raise ValueError(f"workload.visual_fraction={self.visual_fraction} must be within [0, 1]")
        if self.patches_per_item < 1:
            raise ValueError(f"workload.patches_per_item={self.patches_per_item} must be >= 1")

    @property
    def sample_len(self) -> int:
        return self.doc_len or self.seq_len


def param_counts(cfg: KeyeConfig) -> dict[str, int]:
    """Parameters per component, exactly as the model builds them (checked against the meta model)."""
    v, pr, lm = cfg.vision, cfg.projector, cfg.language
    dv, iv = v.hidden_size, v.intermediate_size
    vit_layer = 2 * 2 * dv + 4 * (dv * dv + dv) + (dv * iv + iv) + (iv * dv + dv)
    vit_head = dv + (3 * dv * dv + 3 * dv) + (dv * dv + dv) + 2 * dv + (dv * iv + iv) + (iv * dv + dv)
    vision = (
        v.num_channels * v.patch_size**2 * dv
        + dv  # patch embedding
        + v.position_grid**2 * dv
        + v.num_packing_positions * dv
        + v.num_layers * vit_layer
        + 2 * dv  # post_layernorm
        + (vit_head if v.use_head else 0)
    )
    m = pr.merged_size
    projector = 2 * m + (m * m + m) + (m * pr.text_hidden_size + pr.text_hidden_size)
    d, hd = lm.hidden_size, lm.head_dim
    layer = 2 * d + d * (lm.num_heads + 2 * lm.num_kv_heads) * hd + lm.num_heads * hd * d + 2 * hd
    layer += 3 * d * lm.intermediate_size
    counts = {
        "vision": vision,
        "projector": projector,
        "embed_tokens": lm.vocab_size * d,
        "decoder_layer": layer,
        "decoder_layers": lm.num_layers * layer,
        "norm": d,
        "lm_head": lm.vocab_size * d,
    }
    counts["language"] = counts["embed_tokens"] + counts["decoder_layers"] + d + counts["lm_head"]
    counts["total"] = vision + projector + counts["language"]
    return counts


def matmul_params(cfg: KeyeConfig) -> dict[str, int]:
    """Matmul weights a patch / merged token / text token passes through (the N of 6N)."""
    v, pr, lm = cfg.vision, cfg.projector, cfg.language
    dv, m, d, hd = v.hidden_size, pr.merged_size, lm.hidden_size, lm.head_dim
    vit = v.num_channels * v.patch_size**2 * dv + v.num_layers * (4 * dv * dv + 2 * dv * v.intermediate_size)
    projector = m * m + m * pr.text_hidden_size
    layer = (
        d * (lm.num_heads + 2 * lm.num_kv_heads) * hd + lm.num_heads * hd * d + 3 * d * lm.intermediate_size
    )
    return {
        "vit_per_patch": vit,
        "projector_per_token": projector,
        "llm_per_token": lm.num_layers * layer + lm.vocab_size * d,
    }


@dataclass
class StepTokens:
    """Global amounts of work per optimizer step."""

    tokens: int
    visual_tokens: int
    patches: int


def step_tokens(cfg: KeyeConfig, workload: Workload, layout: Layout) -> StepTokens:
    sequences = layout.dp * layout.microbatches
    visual = int(workload.seq_len * workload.visual_fraction)
    return StepTokens(
        tokens=sequences * workload.seq_len,
        visual_tokens=sequences * visual,
        patches=sequences * visual * cfg.projector.merge_size**2,
    )


def flops_per_step(cfg: KeyeConfig, workload: Workload, layout: Layout) -> dict[str, float]:
    """Model FLOPs of one optimizer step over the global batch, per component (see module docstring)."""
    n = matmul_params(cfg)
    work = step_tokens(cfg, workload, layout)
    v, lm = cfg.vision, cfg.language
    frame = min(workload.patches_per_item, max(work.patches, 1))
    h_attn = lm.num_heads * lm.head_dim
    out = {
        "vit_dense": 6.0 * n["vit_per_patch"] * work.patches,
        "vit_attention": 12.0 * v.num_layers * v.hidden_size * frame * work.patches,
        "projector": 6.0 * n["projector_per_token"] * work.visual_tokens,
        "llm_dense": 6.0 * n["llm_per_token"] * work.tokens,
        "llm_attention": 12.0 * lm.num_layers * h_attn * workload.sample_len * work.tokens,
    }
    out["total"] = sum(out.values())
    return out


def packed_batch_flops(
    cfg: KeyeConfig, *, cu_seqlens: Sequence[int], grid_thw: Sequence[Sequence[int]]
) -> float:
    """Model FLOPs of one packed row with the convention above, from its real sample and frame sizes."""
    n = matmul_params(cfg)
    v, lm = cfg.vision, cfg.language
    lengths = [end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    frames = [h * w for t, h, w in grid_thw for _ in range(t)]
    patches = sum(frames)
    return (
        6.0 * n["llm_per_token"] * sum(lengths)
        + 12.0 * lm.num_layers * lm.num_heads * lm.head_dim * sum(s * s for s in lengths)
        + 6.0 * n["vit_per_patch"] * patches
        + 12.0 * v.num_layers * v.hidden_size * sum(p * p for p in frames)
        + 6.0 * n["projector_per_token"] * patches / cfg.projector.merge_size**2
    )


def mfu(*, flops: float, step_time_s: float, world: int, peak_flops_per_gpu: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the world's peak."""
    if step_time_s <= 0 or peak_flops_per_gpu <= 0 or world < 1:
        raise ValueError(
            f"mfu needs step_time_s > 0, peak_flops_per_gpu > 0, world >= 1 "
            f"(got {step_time_s}, {peak_flops_per_gpu}, {world})"
        )
    return flops / (step_time_s * world * peak_flops_per_gpu)


def _layer_activation_bytes(cfg: KeyeConfig) -> dict[str, float]:
    """Bytes autograd keeps per token (patch, merged token) per layer, bf16 compute, fused SDPA/flash.

    Decoder: each RMSNorm keeps its bf16 input, its fp32 upcast and its bf16 output (8D); q and k keep
    pre-norm bf16, fp32 norm input, post-norm and post-RoPE copies (2+4+2+2 per element), v and the
    attention output 2 each -> 12 * (Hq + Hkv) * hd; SwiGLU keeps gate, up, silu(gate), product (8I).
    ViT: two LayerNorms (input + output, 8 d_v), q/k/v + roped q/k + attention output (12 d_v), fc1 and
    GELU outputs (4 I_v). Projector: norm in/out, linear_1 and GELU outputs (8 M).
    """
    lm, v = cfg.language, cfg.vision
    decoder = 2 * 8 * lm.hidden_size + 12 * (lm.num_heads + lm.num_kv_heads) * lm.head_dim
    decoder += 8 * lm.intermediate_size
    vit = 20 * v.hidden_size + 4 * v.intermediate_size
    return {"decoder": decoder, "vit": vit, "projector": 8 * cfg.projector.merged_size}


def memory_per_rank(cfg: KeyeConfig, workload: Workload, layout: Layout) -> dict[str, float]:
    """Estimated bytes on the most loaded rank; activations both without and with full checkpointing."""
    pc = param_counts(cfg)
    lm = cfg.language
    layers_per_stage = math.ceil(lm.num_layers / layout.pp)
    first = pc["embed_tokens"] + layers_per_stage * pc["decoder_layer"]
    last = layers_per_stage * pc["decoder_layer"] + pc["norm"] + pc["lm_head"]
    llm_rank = pc["language"] if layout.pp == 1 else max(first, last)
    llm_rank /= layout.tp  # TP shards every matmul weight; norms are negligible
    visual = pc["vision"] + pc["projector"]
    llm_shards, visual_shards = layout.dp * layout.cp, layout.world  # ViT/projector: FSDP over the world
    sharded = llm_rank / llm_shards + visual / visual_shards
    # Largest FSDP unit (the one gathered / reduced at a time under ZeRO-3): lm_head+norm or a layer.
    unit = max(pc["lm_head"], pc["embed_tokens"], pc["decoder_layer"]) / layout.tp
    # Under PP, torch.distributed.pipelining keeps gathered params and unsharded grads across
    # micro-batches for every stage, so ZeRO-2/3 cost like ZeRO-1 there.
    keeps_gathered = layout.zero <= 2 or layout.pp > 1
    keeps_full_grads = layout.zero == 1 or layout.pp > 1
    out = {
        "params_fp32_shard": 4 * sharded,
        "grads_fp32_shard": 4 * sharded,
        "adamw_fp32_shard": 8 * sharded,
        "gathered_params_bf16": 2 * (llm_rank + visual) if keeps_gathered else 2 * 2 * unit,
        "unsharded_grads": 4 * (llm_rank + visual) if keeps_full_grads else 2 * (2 + 4) * unit,
    }
    act = _layer_activation_bytes(cfg)
    tokens = workload.seq_len / layout.cp / layout.tp  # CP splits tokens, sequence parallel splits by tp
    in_flight = min(layout.pp, layout.microbatches) if layout.pp > 1 else 1  # 1F1B on the first stage
    work = step_tokens(cfg, workload, layout)
    patches = work.patches / layout.microbatches / layout.world  # the router spreads ViT work over all
    merged = work.visual_tokens / layout.microbatches / layout.world
    vit_full = cfg.vision.num_layers * act["vit"] * patches + act["projector"] * merged
    vit_ckpt = cfg.vision.num_layers * 2 * cfg.vision.hidden_size * patches + act["vit"] * patches
    vit_ckpt += act["projector"] * merged
    llm_full = in_flight * layers_per_stage * act["decoder"] * tokens
    llm_ckpt = in_flight * layers_per_stage * 2 * lm.hidden_size * tokens + act["decoder"] * tokens
    # Logits in bf16, their fp32 upcast for the loss and its fp32 gradient, on the last stage.
    out["logits_and_loss"] = (2 + 4 + 4) * lm.vocab_size * workload.seq_len / layout.cp / layout.tp
    out["activations_no_ac"] = llm_full + vit_full
    out["activations_full_ac"] = llm_ckpt + vit_ckpt
    static = sum(v for k, v in out.items() if not k.startswith("activations"))
    out["total_no_ac"] = static + out["activations_no_ac"]
    out["total_full_ac"] = static + out["activations_full_ac"]
    return out
