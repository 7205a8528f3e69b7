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

Memory: bytes per rank of the most loaded pipeline stage: the runtime's fixed overhead (counted
explicitly), fp32 parameters, gradients and AdamW states (sharded by FSDP2 when world > 1; see
distributed/fsdp.py for the ZeRO mapping), the compute-dtype copies (FSDP's gathered units, or autocast's
bf16 weights at world = 1), the activations autograd keeps in this code base's layers (tensor lists in
`_layer_activation_bytes`) and one chunk of the loss.
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


# Memory of the runtime itself, before any model tensor: the interpreter with torch and keye_train imported
# (CPU: peak RSS of a bare process, measured by bench/estimate_memory.py on the development machine), or
# on CUDA the context plus the caching allocator's slack. Counted explicitly (`runtime_overhead`); pass
# your machine's value with --runtime-overhead-gib.
# CPU: 322 MiB measured (torch 2.13, Linux x86_64; fp32 and bf16 kernels loaded by one tiny step). CUDA:
# an assumed 0.75 GiB (context ~0.5 GiB + allocator slack), not yet measured here.
RUNTIME_OVERHEAD = {"cpu": 322 * 2**20, "cuda": 0.75 * GIB}


def _layer_activation_bytes(
    cfg: KeyeConfig, *, precision: str = "bf16", attention: str = "fused"
) -> dict[str, float]:
    """Bytes autograd keeps per token (patch, merged token) per layer.

    c = bytes of the compute dtype (2 for bf16, 4 for fp32); f = 4 for the fp32 upcasts that bf16 adds
    (RMSNorm's and RoPE's x.float(); in fp32 they are the same tensor, f = 0).
    Decoder: each RMSNorm keeps its input, its upcast and its output ((2c + f) D each); q and k keep
    pre-norm, upcast, post-norm and post-RoPE copies ((3c + f) per element), v and the attention output c
    each -> (4c + f) (Hq + Hkv) hd; SwiGLU keeps gate, up, silu(gate), product (4c I).
    ViT: two LayerNorms (input + output), q/k/v + roped q/k + attention output (10 c d_v), fc1 and GELU
    outputs (2 c I_v). Projector: norm in/out, linear_1 and GELU outputs (4 c M).
    attention="sdpa" (the reference backend, CPU default) also keeps the per-length gathered q/k/v copies
    that it hands to SDPA (c (Hq + 2 Hkv) hd per decoder layer, 3 c d_v per ViT layer).
    """
    lm, v = cfg.language, cfg.vision
    c = 2 if precision == "bf16" else 4
    f = 4 if precision == "bf16" else 0
    heads = (lm.num_heads + lm.num_kv_heads) * lm.head_dim
    decoder = 2 * (2 * c + f) * lm.hidden_size + (4 * c + f) * heads + 4 * c * lm.intermediate_size
    vit = 10 * c * v.hidden_size + 2 * c * v.intermediate_size
    if attention == "sdpa":
        decoder += c * (lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim
        vit += 3 * c * v.hidden_size
    return {"decoder": decoder, "vit": vit, "projector": 4 * c * cfg.projector.merged_size}


def _matmul_weights(cfg: KeyeConfig) -> float:
    """Parameters that pass through a matmul (autocast keeps a bf16 copy of each for backward)."""
    pc = param_counts(cfg)
    return pc["total"] - pc["embed_tokens"] - cfg.vision.num_packing_positions * cfg.vision.hidden_size


def memory_per_rank(
    cfg: KeyeConfig,
    workload: Workload,
    layout: Layout,
    *,
    precision: str = "bf16",
    loss_chunk_tokens: int = 1024,
    device: str = "cuda",
    runtime_overhead: float | None = None,
) -> dict[str, float]:
    """Estimated bytes on the most loaded rank; activations both without and with full checkpointing.

    world > 1: FSDP2 (bf16 compute via MixedPrecisionPolicy when precision=bf16). world = 1: no FSDP,
    fp32 parameters / gradients / AdamW states in full, and under bf16 autocast a bf16 copy of every
    matmul weight saved for backward. The loss is the chunked one (models/lm_head.py): one chunk's
    logits, log-softmax and gradient at a time (loss_chunk_tokens=0: the whole row's).
    """
    compute = 2 if precision == "bf16" else 4
    attention = "sdpa" if device == "cpu" else "fused"
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
    if layout.world == 1:  # no FSDP: nothing is gathered; autocast's bf16 weight copies instead
        gathered = 2 * _matmul_weights(cfg) if precision == "bf16" else 0.0
        unsharded = 0.0
    else:
        gathered = compute * (llm_rank + visual) if keeps_gathered else 2 * compute * unit
        unsharded = 4 * (llm_rank + visual) if keeps_full_grads else 2 * (compute + 4) * unit
    out = {
        "runtime_overhead": RUNTIME_OVERHEAD[device] if runtime_overhead is None else runtime_overhead,
        "params_fp32_shard": 4 * sharded,
        "grads_fp32_shard": 4 * sharded,
        "adamw_fp32_shard": 8 * sharded,
        "gathered_params": gathered,
        "unsharded_grads": unsharded,
    }
    act = _layer_activation_bytes(cfg, precision=precision, attention=attention)
    tokens = workload.seq_len / layout.cp / layout.tp  # CP splits tokens, sequence parallel splits by tp
    in_flight = min(layout.pp, layout.microbatches) if layout.pp > 1 else 1  # 1F1B on the first stage
    work = step_tokens(cfg, workload, layout)
    patches = work.patches / layout.microbatches / layout.world  # the router spreads ViT work over all
    merged = work.visual_tokens / layout.microbatches / layout.world
    vit_full = cfg.vision.num_layers * act["vit"] * patches + act["projector"] * merged
    vit_ckpt = cfg.vision.num_layers * compute * cfg.vision.hidden_size * patches + act["vit"] * patches
    vit_ckpt += act["projector"] * merged
    llm_full = in_flight * layers_per_stage * act["decoder"] * tokens
    llm_ckpt = in_flight * layers_per_stage * compute * lm.hidden_size * tokens + act["decoder"] * tokens
    # The chunked loss on the last stage: one chunk's logits (compute dtype, then the fp32 upcast), the
    # log-softmax cross entropy keeps and the fp32 gradient; vocab-sharded over tp. The pipeline's last
    # stage computes the same chunked loss inside its forward (distributed/pipeline.py).
    rows = workload.seq_len / layout.cp
    chunk = rows if loss_chunk_tokens <= 0 else min(loss_chunk_tokens, rows)
    upcast = 4 if precision == "bf16" else 0
    out["logits_and_loss"] = (compute + upcast + 4 + 4) * lm.vocab_size / layout.tp * chunk
    out["activations_no_ac"] = llm_full + vit_full
    out["activations_full_ac"] = llm_ckpt + vit_ckpt
    static = sum(v for k, v in out.items() if not k.startswith("activations"))
    out["total_no_ac"] = static + out["activations_no_ac"]
    out["total_full_ac"] = static + out["activations_full_ac"]
    return out
