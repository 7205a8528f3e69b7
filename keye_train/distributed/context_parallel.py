"""Context parallelism: Ulysses all-to-all over heads (DeepSpeed DistributedAttention); ring attention on GPU.

Each CP rank holds a contiguous S/cp slice of the packed sequence (tokens, labels, M-RoPE positions) through
the whole decoder. Only attention needs the other ranks' tokens:

- ulysses (CPU and GPU): before attention an all-to-all trades the sequence split for a head split, so each
  rank attends over the FULL sequence with heads/cp of the heads, using the unsplit cu_seqlens (document
  masking of packed samples is unchanged), then a second all-to-all trades back. RoPE is applied before
  the exchange, by each rank to its own slice with its own slice of position_ids, so M-RoPE needs nothing
  special. Heads (query and KV, after any TP split) must be divisible by cp.
- ring (CUDA only): PyTorch's experimental ring attention (`torch.distributed.tensor.experimental.
  context_parallel`) passes K/V blocks around the ring with head-tail causal load balancing. It is causal
  over a whole row: packed multi-document rows are refused, and visual batches are not supported yet (the
  load-balanced token order is not routed to the visual splice, so model.embed's count check fails). It
  cannot run on CPU, and it has not been run in this repository's tests (no GPU in CI).

Visual embeddings are routed, not gathered: the ViT output (ordered as the pad tokens of the full sequence)
is cut per rank to the pad tokens inside that rank's slice (`split_for_context_parallel` returns their
indices), so `model.embed` splices exactly the local pad tokens and no rank builds full-sequence embeddings.
This is also the form in which the heterogeneous ViT router delivers embeddings to LLM ranks.

Loss: every CP (and DP) rank sees different tokens, so each divides its summed loss by the GLOBAL target
count (`global_target_count` over dp_cp) and gradients are SUMMED over dp_cp (FSDP with a divide factor
of 1, or an all-reduce SUM), which reproduces the single-process gradient exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from keye_train.models.attention import AttentionFn

CP_IMPLS = ("ulysses", "ring")


@dataclass
class ContextParallelConfig:
    """`parallel.context`: which context-parallel attention to use (the degree is parallel.cp)."""

    cp_impl: str = "ulysses"

    def __post_init__(self) -> None:
        if self.cp_impl not in CP_IMPLS:
            raise ValueError(f"parallel.context.cp_impl={self.cp_impl!r} must be one of {CP_IMPLS}")


def _init_deepspeed_comm() -> None:
    """DistributedAttention talks through `deepspeed.comm`, which must wrap the existing torch process
    group once per process (its collectives then run on the groups we pass)."""
    import deepspeed.comm as ds_comm
    import deepspeed.ops

    if not ds_comm.is_initialized():
        # Its backend JIT-compiles a shared-memory all-reduce op on first init (g++ over torch's headers:
        # 36 s on a fresh 2-core machine, more under load) that only its own inference all-reduce calls;
        # Ulysses needs nothing but all-to-all on our groups. An op marked incompatible is not built
        # (DeepSpeed probes this dict once per process and keeps edits to it).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)


class UlyssesAttention:
    """An `attention_fn` (q, k, v, *, cu_seqlens, causal) for local S/cp tokens: DeepSpeed's all-to-all
    around the model's own packed attention.

    Layout: our tensors are batch-first (B, S, H, D), so DistributedAttention gets batch_dim_idx=0 with
    scatter_idx=2 (heads are split) and gather_idx=1 (the sequence is gathered); its default (2, 0) is for
    Megatron's seq-first layout. Heads are split into contiguous blocks, query and KV alike: with 4 query
    and 2 KV heads at cp=2, rank r holds query heads 2r, 2r+1 and KV head r, which is exactly the GQA group
    of those query heads, so the local attention's GQA stays correct.
    """

    def __init__(self, local_attention: AttentionFn, *, group: dist.ProcessGroup) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        _init_deepspeed_comm()
        self.local_attention = local_attention
        self.cp = dist.get_world_size(group)
        self.distributed = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None, causal: bool) -> Tensor:
        for name, heads in (("query", q.shape[2]), ("key/value", k.shape[2])):
            # DeepSpeed's uneven-head path reads a process-global sequence-parallel group; we refuse it.
            if heads % self.cp:
                raise ValueError(
                    f"Ulysses context parallelism needs the {name} heads on this rank ({heads}, after any "
                    f"tensor-parallel split) divisible by cp={self.cp}; lower cp (or tp)"
                )
        # cu_seqlens describes the FULL sequence: after the all-to-all the local attention sees all tokens.
        return self.distributed(q, k, v, 0, None, cu_seqlens=cu_seqlens, causal=causal)


class RingAttention:
    """An `attention_fn` for PyTorch's ring attention; run forward and backward inside `ring_context`."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None, causal: bool) -> Tensor:
        batch = q.shape[0]
        if q.device.type != "cuda":
            raise RuntimeError(_RING_ON_CPU)
        if cu_seqlens is not None and cu_seqlens.numel() - 1 != batch:
            documents = cu_seqlens.numel() - 1
            raise ValueError(
                f"ring attention is causal over whole rows and cannot mask the {documents} packed documents "
                f"of {batch} row(s); use cp_impl='ulysses' for packed sequences"
            )
        # Inside `context_parallel` PyTorch patches SDPA into its ring kernel over (B, H, S_local, D) shards.
        qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
        if ks.shape[1] != qs.shape[1]:  # the ring kernels take equal head counts: expand the GQA groups
            repeat = qs.shape[1] // ks.shape[1]
            ks, vs = ks.repeat_interleave(repeat, dim=1), vs.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(1, 2)


_RING_ON_CPU = (
    "cp_impl='ring' needs CUDA: PyTorch's ring attention only dispatches the CUDA flash / efficient / cuDNN "
    "SDPA kernels. Use cp_impl='ulysses' on CPU (gloo)."
)


def apply_context_parallel(model: nn.Module, *, cp_mesh: DeviceMesh, cp_impl: str = "ulysses") -> nn.Module:
    """Swap every decoder attention's `attention_fn` for its context-parallel version, in place.

    Parameters are untouched (CP ranks hold identical weights; FSDP shards them over dp_shard x cp).
    Feed each rank its `split_for_context_parallel` slice with the full cu_seqlens.
    """
    ContextParallelConfig(cp_impl=cp_impl)
    if cp_impl == "ring" and cp_mesh.device_type != "cuda":
        raise RuntimeError(_RING_ON_CPU)
    for layer in model.model.layers.values():
        attention = layer.self_attn
        if isinstance(attention.attention_fn, (UlyssesAttention, RingAttention)):
            raise ValueError("apply_context_parallel was already applied to this model")
        if cp_impl == "ulysses":
            attention.attention_fn = UlyssesAttention(attention.attention_fn, group=cp_mesh.get_group())
        else:
            attention.attention_fn = RingAttention()
    return model


@contextlib.contextmanager
def ring_context(cp_mesh: DeviceMesh, *, buffers: list[Tensor], seq_dims: list[int]) -> Iterator[None]:
    """Run forward AND backward in here for cp_impl='ring': PyTorch shards `buffers` (full-length input_ids,
    labels, position_ids) in place along `seq_dims` with head-tail load balancing for causal masks, and
    patches SDPA into ring attention; the buffers are restored on exit."""
    if cp_mesh.device_type != "cuda":
        raise RuntimeError(_RING_ON_CPU)
    from torch.distributed.tensor.experimental import context_parallel

    with context_parallel(cp_mesh, buffers=buffers, buffer_seq_dims=seq_dims):
        yield


# Per-token tensors and the dimension of their sequence axis; everything else passes through unsplit.
_SEQUENCE_DIMS = {"input_ids": 1, "labels": 1, "position_ids": 2}


def split_for_context_parallel(
    batch: dict[str, Tensor],
    *,
    cp_rank: int,
    cp_size: int,
    visual_token_ids: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """This CP rank's contiguous S/cp slice of input_ids, labels (B, S) and position_ids (3, B, S).

    cu_seqlens stays the FULL sequence's (the local attention runs on all tokens after the all-to-all);
    pixel_values and grid_thw pass through. With visual_token_ids, "visual_index" lists the rows of the
    visual embeddings (ordered as the pad tokens of the full sequence) that this rank splices, in its own
    order; pick them with `local_visual_embeds`. Labels are already shifted inside each sample, so a slice
    boundary never needs the next rank's token.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must be in [0, cp_size={cp_size})")
    seqlen = batch["input_ids"].shape[1]
    if seqlen % cp_size:
        raise ValueError(
            f"context parallelism needs the sequence length divisible by cp: S={seqlen}, cp={cp_size}; pad "
            f"the packed batch to a multiple of {cp_size} (toy_packed_batch(seq_len=...), packing.seq_len)"
        )
    chunk = seqlen // cp_size
    lo, hi = cp_rank * chunk, (cp_rank + 1) * chunk
    out = dict(batch)
    for key, dim in _SEQUENCE_DIMS.items():
        if key in batch:
            out[key] = batch[key].narrow(dim, lo, chunk)
    if visual_token_ids is not None:
        ids = batch["input_ids"]
        is_visual = torch.isin(ids, torch.tensor(list(visual_token_ids), device=ids.device))
        # model.embed fills pad tokens in row-major order over (B, S): a pad token's rank in that order is
        # the row of the visual embeddings it receives.
        order = (is_visual.flatten().cumsum(0) - 1).view_as(ids)
        out["visual_index"] = order[:, lo:hi][is_visual[:, lo:hi]]
    return out


def local_visual_embeds(visual_embeds: Tensor | None, visual_index: Tensor) -> Tensor | None:
    """The rows of the full sequence's visual embeddings that this CP rank's slice splices (the gradient
    flows back to exactly those rows, so summing the ViT gradients over CP ranks gives the full one)."""
    if visual_embeds is None:
        return None
    return visual_embeds[visual_index.to(visual_embeds.device)]


class VisualRoute:
    """What `route_visual_to_slice` captured: the projector's full output of this step."""

    def __init__(self) -> None:
        self.full: Tensor | None = None

    def zero_anchor(self) -> Tensor | float:
        """Add to the loss: exactly zero, but it ties the ViT and projector into this rank's backward even
        when its slice holds no pad token (model.embed then ignores the empty embeddings). FSDP2 reduces
        per unit, so every rank must run every unit's backward; plain all-reduces need the grads to exist."""
        return 0.0 if self.full is None else self.full.sum() * 0.0


@contextlib.contextmanager
def route_visual_to_slice(model: nn.Module, visual_index: Tensor) -> Iterator[VisualRoute]:
    """While active, the projector's output (visual embeddings of the full sequence, encoded inside the
    model's forward from pixel_values) is cut to this CP rank's rows, so `model(local_ids, pixel_values=...)`
    splices exactly the local pad tokens. Keeping the ViT inside the root forward is what FSDP2 needs (its
    root must run forward first); with precomputed embeddings use `local_visual_embeds` instead.
    Add the yielded route's `zero_anchor()` to the loss."""
    route = VisualRoute()

    def cut(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        route.full = out
        return out[visual_index.to(out.device)]

    handle = model.mlp_AR.register_forward_hook(cut)
    try:
        yield route
    finally:
        handle.remove()


def global_target_count(count: Tensor, *, mesh: DeviceMesh | None) -> Tensor:
    """Sum of target-token counts over the ranks that see different tokens (the dp_cp mesh view), so that
    each rank's loss_sum / global count adds up to the single-process mean. No gradient flows through it."""
    total = count.detach().clone()
    if mesh is not None and mesh.size() > 1:
        dist.all_reduce(total, group=mesh.get_group())
    return total
