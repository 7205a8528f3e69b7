"""Attention over packed variable-length sequences.

Backends: sdpa (the reference: equal-length documents batched per SDPA call), varlen (torch's own
`torch.nn.attention.varlen.varlen_attn`, flash kernels shipped with torch on CUDA, bf16/fp16), flex
(FlexAttention with a document mask; compiled, hence fused, on CUDA), flash (the flash-attn package's
varlen kernel, when installed). `auto` picks the fastest that needs no extra package: on CUDA varlen
for bf16/fp16 inputs where the installed torch has it, else compiled flex; on CPU sdpa.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# (q, k, v, *, cu_seqlens, causal) -> out; q (B, S, H, D), k/v (B, S, Hkv, D), out (B, S, H, D).
# Context parallelism swaps this callable from outside the model (see distributed/context_parallel.py).
AttentionFn = Callable[..., Tensor]


def rows_as_segments(batch: int, seqlen: int, device: torch.device) -> Tensor:
    """cu_seqlens that make every batch row its own sequence."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


# Not traced by torch.compile: the grouping by length is Python over cu_seqlens' values, so dynamo would break
# the graph inside it and specialise (recompile) the rest on every new document layout; one break at the call
# instead leaves each block's compiled graphs independent of the packing (and a quarter less to compile).
@torch.compiler.disable
def sdpa_varlen(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, causal: bool) -> Tensor:
    """Reference path: segments of equal length are batched into one SDPA call each.

    Grouping by length keeps the call count small for video (all frames of a video share a size) and
    avoids materialising an S x S mask, which at 20K-patch images or 128K tokens would not fit.
    """
    batch, seqlen, heads, dim = q.shape
    q_flat, k_flat, v_flat = (t.reshape(batch * seqlen, t.shape[2], dim) for t in (q, k, v))
    bounds = cu_seqlens.tolist()
    starts_by_len: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            starts_by_len.setdefault(end - start, []).append(start)
    out = None
    for length, starts in starts_by_len.items():
        index = torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)
        qs, ks, vs = (t[index].transpose(1, 2) for t in (q_flat, k_flat, v_flat))  # (n, H, L, D)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=ks.shape[1] != heads)
        if out is None:  # SDPA's dtype: bf16 under autocast even when rotated q/k came out fp32
            out = o.new_empty(q_flat.shape)
        out[index] = o.transpose(1, 2)
    if out is None:  # no token at all
        out = q_flat.new_empty(q_flat.shape)
    return out.view(batch, seqlen, heads, dim)


def _same_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One dtype for q, k, v: under autocast the rotated q/k come out fp32 (RoPE runs in fp32) while v is
    bf16; SDPA casts them itself, the other kernels need it done (to the autocast dtype)."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype
    return q.to(dtype), k.to(dtype), v.to(dtype)


def flash_varlen(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, causal: bool) -> Tensor:
    """flash-attn varlen kernel (CUDA only); GQA is native to the kernel."""
    from flash_attn import flash_attn_varlen_func

    q, k, v = _same_dtype(q, k, v)
    batch, seqlen, heads, dim = q.shape
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    max_seqlen = int(lengths.max())
    flat = (t.reshape(batch * seqlen, t.shape[2], dim) for t in (q, k, v))
    out = flash_attn_varlen_func(
        *flat,
        cu_seqlens_q=cu_seqlens.int(),
        cu_seqlens_k=cu_seqlens.int(),
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        causal=causal,
    )
    return out.view(batch, seqlen, heads, dim)


def flex_varlen(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, causal: bool) -> Tensor:
    """FlexAttention with a document mask built from cu_seqlens."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = _same_dtype(q, k, v)
    batch, seqlen, heads, dim = q.shape
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError(
            "attention backend 'flex' has no backward pass on CPU in PyTorch; use 'sdpa' to train on CPU"
        )
    total = batch * seqlen
    positions = torch.arange(total, device=q.device)
    document = torch.searchsorted(cu_seqlens.to(q.device, torch.long), positions, right=True)

    def mask_mod(b, h, q_idx, kv_idx):
        same = document[q_idx] == document[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    # On CUDA the mask is built compiled, block by block: eager it evaluates the full total x total grid.
    on_cuda = q.device.type == "cuda"
    block_mask = create_block_mask(mask_mod, None, None, total, total, device=q.device, _compile=on_cuda)
    qs, ks, vs = (t.reshape(1, total, t.shape[2], dim).transpose(1, 2) for t in (q, k, v))
    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    out = kernel(qs, ks, vs, block_mask=block_mask, enable_gqa=ks.shape[1] != heads)
    return out.transpose(1, 2).reshape(batch, seqlen, heads, dim)


@functools.cache
def _compiled_flex() -> AttentionFn:
    """FlexAttention is only fused (and fast) when compiled; eager it materialises the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


@functools.cache
def torch_varlen_available() -> bool:
    """torch ships `varlen_attn` (2.10+); it runs on CUDA only."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _varlen_kwargs(causal: bool) -> dict:
    """The causal switch of the installed torch: `window_size=(-1, 0)` (2.11+) or `is_causal` (2.10)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return {"window_size": (-1, 0) if causal else (-1, -1)}
    return {"is_causal": causal}


def torch_varlen(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor, causal: bool) -> Tensor:
    """torch's own varlen flash attention (CUDA, bf16/fp16); K/V heads repeated when the installed torch
    has no native GQA."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    q, k, v = _same_dtype(q, k, v)
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(
            f"attention backend 'varlen' needs bf16 or fp16 inputs (got {q.dtype}); run with precision=bf16 "
            "or use model.attn_backend=flex"
        )
    batch, seqlen, heads, dim = q.shape
    q_flat, k_flat, v_flat = (t.reshape(batch * seqlen, t.shape[2], dim) for t in (q, k, v))
    kwargs = dict(_varlen_kwargs(causal))
    if k_flat.shape[1] != heads:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            kwargs["enable_gqa"] = True
        else:
            repeat = heads // k_flat.shape[1]
            k_flat, v_flat = (t.repeat_interleave(repeat, dim=1) for t in (k_flat, v_flat))
    cu = cu_seqlens.to(q.device, torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = varlen_attn(q_flat, k_flat, v_flat, cu, cu, max_len, max_len, **kwargs)
    return out.view(batch, seqlen, heads, dim)


_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_varlen,
    "flash": flash_varlen,
    "flex": flex_varlen,
    "varlen": torch_varlen,
}
BACKENDS = ("auto", *_BACKENDS)


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The default kernel: on CUDA torch's varlen for half precision where it exists, else compiled flex;
    sdpa on CPU (flex has no CPU backward)."""
    if device.type != "cuda":
        return "sdpa"
    if dtype in (torch.bfloat16, torch.float16) and torch_varlen_available():
        return "varlen"
    return "flex"


@functools.cache
def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> AttentionFn:
    """The attention function for a configured backend name.

    `flash` needs CUDA and an importable flash-attn; asking for it elsewhere is an error rather than a
    silent fallback, so a run never reports a kernel it did not use.
    """
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; use one of {BACKENDS}")
    if name == "varlen" and (device.type != "cuda" or not torch_varlen_available()):
        raise RuntimeError(
            f"attention backend 'varlen' needs CUDA and torch.nn.attention.varlen (torch >= 2.10; "
            f"device={device}, torch {torch.__version__}); use backend 'flex' or 'sdpa'"
        )
    if name == "flash" and (device.type != "cuda" or not flash_available()):
        raise RuntimeError(
            f"attention backend 'flash' needs CUDA and flash-attn (device={device}, "
            f"flash-attn importable={flash_available()}); install the `gpu` extra or use backend 'sdpa'"
        )
    return _BACKENDS[name]


def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None, causal: bool, backend: str
) -> Tensor:
    """Attention that never crosses the segment boundaries of cu_seqlens (rows are segments if None)."""
    if cu_seqlens is None:
        cu_seqlens = rows_as_segments(q.shape[0], q.shape[1], q.device)
    if backend == "auto":
        device = q.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype
        backend = auto_backend(q.device, dtype)
    return resolve_backend(backend, q.device)(q, k, v, cu_seqlens=cu_seqlens, causal=causal)
